"""What a person sees of `trainflow run` in a terminal, and that stopping it leaves nothing running."""

from __future__ import annotations

import os
import pty
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
# Ray's core worker logs "[2026-11-28 13:45:29,585 E 30186 30234] core_worker.cc:…" lines to the console
RAY_ERROR_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+ E \d+ \d+\]", re.MULTILINE)


def ray_noise(text: str) -> list[str]:
    """What a successful run must not print: Ray Train's per-report lines, Ray's error lines, tracebacks."""
    found = ["TrainingReport"] if "TrainingReport" in text else []
    found += RAY_ERROR_LINE.findall(text)
    return found + (["Traceback"] if "Traceback" in text else [])


class Terminal:
    """A command whose stdout and stderr are a pseudo-terminal, as when a person runs it; keeps what it printed."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        master, slave = pty.openpty()
        self.proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, cwd=ROOT, env=env,
                                     start_new_session=True)
        os.close(slave)
        self.chunks: list[bytes] = []
        self.reader = threading.Thread(target=self._read, args=(master,), daemon=True)
        self.reader.start()

    def _read(self, master: int) -> None:
        try:
            while chunk := os.read(master, 65536):
                self.chunks.append(chunk)
        except OSError:  # EIO: every process holding the terminal is gone
            pass
        finally:
            os.close(master)

    @property
    def text(self) -> str:
        return b"".join(self.chunks).decode(errors="replace")

    def wait_for(self, pattern: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.text):
            assert self.proc.poll() is None, f"exited ({self.proc.returncode}) before {pattern!r}:\n{self.text[-3000:]}"
            assert time.monotonic() < deadline, f"no {pattern!r} within {timeout} s:\n{self.text[-3000:]}"
            time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_terminal_gets_bars_and_sigterm_mid_epoch_leaves_nothing_running(tmp_path):
    # no PREFECT_API_URL: the run starts Prefect's temporary server, which must not print, and stops it
    env = {**{k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}, "TERM": "xterm-256color",
           "COLUMNS": "120"}
    run = Terminal([sys.executable, "-m", "flows.cli", "run", "--preset", "smoke", "--epochs", "300",
                    "--store", str(tmp_path / "store")], env)
    try:
        run.wait_for(r"epoch 3/300", timeout=300)
        started = [p for p in psutil.Process(run.proc.pid).children(recursive=True) if p.status() != "zombie"]
        names = " ".join(p.name() for p in started)
        assert "raylet" in names and "gcs_server" in names, names  # Ray, started by this run

        before_stop = run.text  # what a run shows while it runs; stopping it may make Ray's core worker complain
        stopped_at = time.monotonic()
        run.proc.send_signal(signal.SIGTERM)
        code = run.proc.wait(timeout=30)
        took = time.monotonic() - stopped_at
    finally:
        if run.proc.poll() is None:
            os.killpg(run.proc.pid, signal.SIGKILL)
    _, alive = psutil.wait_procs(started, timeout=10)
    assert not alive, [" ".join(p.cmdline()[:3]) for p in alive]
    assert code != 0 and took <= 30, (code, took)
    text = run.text
    assert "trainflow: stopped" in text, text[-2000:]
    # one bar per stage and per epoch: rich's bar glyphs, images/s and an ETA on the epoch's line
    assert "━" in text and re.search(r"epoch 2/300 .*img/s", text), text[-3000:]
    assert re.search(r"ingest .*\d s", text) and "preprocess" in text, text[-3000:]
    assert not ray_noise(before_stop), ray_noise(before_stop)
    assert "Starting temporary server" not in text, text[-3000:]  # nor Prefect's log lines
