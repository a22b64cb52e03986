"""Run the docs' command blocks one after another, as a user in one terminal would, and say how each went.

``python tests/docs/runblocks.py SPEC.json`` reads the blocks and writes what happened next to the spec (see
:func:`main`). Each block is one ``bash -euo pipefail`` script; the exports and the folder it ends in carry
over to the next block, as they would in the user's terminal. A block marked "runs until stopped" gets a
Ctrl-C (SIGINT to its shell and everything the shell is still running, as a terminal sends it to the
foreground job) once it has printed its ready text. After the last block, every process that inherited this
run's mark and still runs was left behind by the docs: it is named in the result, then killed.

Only the standard library: this runs inside a fresh network and PID namespace (see test_commands.py), before
and without the project's imports.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

MARK = "DOCS_RUN_MARK"  # in every process a block starts, and only those: finds what the docs left running
STATE = "DOCS_STATE"  # the folder holding the carried environment and working folder, and each block's log
CTRL_C_GRACE_S = 60.0  # how long a stopped block may take to end after its Ctrl-C
TRACEBACK = "Traceback (most recent call last)"

# Before each block: the exports and the folder the previous block ended with; after it, save them again.
PRELUDE = """\
if [ -f "$DOCS_STATE/env.sh" ]; then source "$DOCS_STATE/env.sh"; fi
cd "$(cat "$DOCS_STATE/cwd")"
trap 'export -p > "$DOCS_STATE/env.sh"; pwd > "$DOCS_STATE/cwd"' EXIT
"""


def process_table() -> dict[int, tuple[int, int]]:
    """Every running process now: pid -> (parent pid, start time); zombies count as gone.

    tests/raycluster.py uses it too: this module imports only the standard library, as it runs on its own.
    """
    table = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()  # after "(comm)", which may hold spaces
            if fields[0] not in ("Z", "X"):
                table[int(entry.name)] = (int(fields[1]), int(fields[19]))
    return table


def _table() -> dict[int, int]:
    """Every running process now: pid -> parent pid."""
    return {pid: parent for pid, (parent, _) in process_table().items()}


def descendants(pid: int) -> list[int]:
    """``pid``'s live descendants now, parents before children."""
    children: dict[int, list[int]] = {}
    for child, parent in _table().items():
        children.setdefault(parent, []).append(child)
    found, todo = [], list(children.get(pid, []))
    while todo:
        found.append(todo.pop(0))
        todo.extend(children.get(found[-1], []))
    return found


def marked(mark: str) -> list[int]:
    """Live processes whose environment carries ``MARK=mark``, never this process or its ancestors."""
    table, mine, pid = _table(), set(), os.getpid()
    while pid > 0 and pid not in mine:
        mine.add(pid)
        pid = table.get(pid, 0)
    needle = f"{MARK}={mark}".encode()
    found = []
    for pid in table:
        try:
            if pid not in mine and needle in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                found.append(pid)
        except OSError:
            continue
    return sorted(found)


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()[:200]
    except OSError:
        return "(gone)"


def signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def kill_marked(mark: str) -> list[str]:
    """SIGKILL every process carrying ``mark``; returns their command lines."""
    pids = marked(mark)
    lines = [command_line(pid) for pid in pids]
    signal_all(pids, signal.SIGKILL)
    return lines


def _tail(path: Path, chars: int = 6000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def _as_in_a_terminal() -> None:
    """Ctrl-C does what it does in a terminal, even when this runner was started with SIGINT ignored (a
    background job of a non-interactive shell, e.g. `nohup make test &`): the child would inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_block(index: int, block: dict, state: Path, workdir: Path) -> dict:
    """Run one block; returns its id, status (ok, failed, timeout, no-ready-text, no-stop, traceback), seconds,
    exit code and the end of its output."""
    script = state / f"block-{index:02d}.sh"
    log = state / f"block-{index:02d}.log"
    script.write_text(PRELUDE + block["body"] + "\n")
    started = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(["bash", "-euo", "pipefail", str(script)], cwd=workdir, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=_as_in_a_terminal)
    status, stop_on, interrupted_at = "ok", block.get("stop_on"), None
    deadline = started + block["timeout"]
    while proc.poll() is None:
        now = time.monotonic()
        if stop_on and interrupted_at is None and stop_on in _tail(log, 200_000):
            signal_all([proc.pid, *descendants(proc.pid)], signal.SIGINT)  # a terminal's Ctrl-C
            interrupted_at = now
        if now > deadline or (interrupted_at is not None and now > interrupted_at + CTRL_C_GRACE_S):
            status = "timeout" if interrupted_at is None else "no-stop"
            signal_all([proc.pid, *descendants(proc.pid)], signal.SIGKILL)
            proc.wait()
            break
        time.sleep(0.25)
    output = log.read_text(errors="replace")
    if status == "ok":
        if stop_on and interrupted_at is None:
            status = "no-ready-text"
        elif proc.returncode not in ((0, 130, -signal.SIGINT) if stop_on else (0,)):
            status = "failed"
        elif TRACEBACK in output:
            status = "traceback"
    return {"id": block["id"], "status": status, "seconds": round(time.monotonic() - started, 1),
            "returncode": proc.returncode, "tail": output[-6000:], "log": str(log)}


def main(spec_path: str) -> int:
    """Run the spec's blocks in order, stopping at the first that does not succeed.

    The spec (JSON): ``blocks`` (each ``id``, ``body``, ``timeout`` seconds, ``stop_on`` ready text or
    null), ``workdir``, ``results`` (where to write the outcome), ``leftover_grace`` (seconds that processes
    a block stopped may take to end) and ``netns`` (bring up loopback first). The environment carries
    ``DOCS_RUN_MARK`` and ``DOCS_STATE``.
    """
    spec = json.loads(Path(spec_path).read_text())
    state, workdir, results_path = Path(os.environ[STATE]), Path(spec["workdir"]), Path(spec["results"])
    if spec.get("netns"):
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    (state / "cwd").write_text(str(workdir))
    results: dict = {"blocks": [], "left_running": []}
    for index, block in enumerate(spec["blocks"]):
        print(f"{block['id']}: running", flush=True)
        outcome = run_block(index, block, state, workdir)
        results["blocks"].append(outcome)
        results_path.write_text(json.dumps(results, indent=1))
        print(f"{block['id']}: {outcome['status']} in {outcome['seconds']} s", flush=True)
        if outcome["status"] != "ok":
            break
    deadline = time.monotonic() + spec.get("leftover_grace", 30)
    while marked(os.environ[MARK]) and time.monotonic() < deadline:
        time.sleep(0.5)
    results["left_running"] = kill_marked(os.environ[MARK])
    results_path.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
