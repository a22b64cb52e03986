"""The docs' commands run as written: every ```bash block of README.md and docs/*.md is run here, or says why not.

A block is run unless an HTML comment right before it says ``<!-- not run by the tests: REASON -->`` (it needs
a cloud account, a GPU cluster, Docker, or it is the suite itself). A block whose last command runs until
stopped (a server, a worker) says ``<!-- runs until stopped: the tests press Ctrl-C once it prints "TEXT" -->``.
Output is a ```text or ```console block, and not run; an unlabelled block (a diagram, a layout) holds no command.

The blocks run in order, README.md first and then the guide, as a user who follows them in one terminal
(exports and the current folder carry from block to block; tests/docs/runblocks.py), in a fresh home folder
and a working folder that looks like this checkout (its files linked, its own ./artifacts). They run in a
network and PID namespace of their own where the machine allows it, so the docs' fixed ports (4200, 6380,
8265, 8333, ...) are free and nothing they start can outlive the test; every process still running after the
last block, which the docs forgot to stop, fails the test. The cluster walk at the end of the guide is a test
of its own: it must complete all three ways (host:port, ray://, trainflow submit).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.docs import runblocks

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN = re.compile(r"<!--\s*not run by the tests:\s*(?P<reason>.*?)\s*-->\Z", re.DOTALL)
CTRL_C = re.compile(r'<!--\s*runs until stopped: the tests press Ctrl-C once it prints "(?P<text>[^"]+)"\s*-->\Z')
WALK_SECTION = "Cluster walk"  # docs/guide.md's heading; its blocks are test_the_cluster_walk's
MAX_NOT_RUN = 8  # blocks that cannot run here are few: the suite itself, clouds, a GPU cluster, your own S3
# What `trainflow run --ray-address ray://...` says when the head's Ray Client server for it died at start.
BLOCK_TIMEOUT_S = 600  # one block (the walk, about two minutes on two busy cores, is the longest)
SHELL_LANGS = {"sh", "shell", "zsh", "console-session"}  # would escape this test: write bash, or text for output
COMMAND_LINE = re.compile(r"^\s*(?:\$ |trainflow |make |python |\.venv/|ray |prefect |export |pip |source )")
LINKED_NOT = {".git", "artifacts", ".pytest_cache", "__pycache__", "build", ".venv"}


@dataclass(frozen=True)
class Block:
    """One fenced code block of a page, with the marker comment right before it (if any)."""

    page: Path
    line: int
    lang: str
    body: str
    section: str
    marker: str

    @property
    def id(self) -> str:
        return f"{self.page.name}:{self.line}"

    @property
    def not_run(self) -> str | None:
        """Why the tests do not run it, when its marker says so."""
        found = NOT_RUN.search(self.marker)
        return found["reason"] if found else None

    @property
    def stop_on(self) -> str | None:
        """The text after which the tests press Ctrl-C, for a block that runs until stopped."""
        found = CTRL_C.search(self.marker)
        return found["text"] if found else None


def blocks(page: Path) -> list[Block]:
    """Every fenced block of ``page``, in order."""
    text = page.read_text(encoding="utf-8")
    found = []
    for fence in re.finditer(r"^```(?P<lang>[^\n`]*)\n(?P<body>.*?)^```[ \t]*$", text, re.MULTILINE | re.DOTALL):
        before = text[:fence.start()].rstrip()
        marker = before[before.rfind("<!--"):] if before.endswith("-->") else ""
        prose = re.sub(r"^```.*?^```", "", before, flags=re.MULTILINE | re.DOTALL)
        headings = re.findall(r"^#{1,6}\s+(.+?)\s*$", prose, re.MULTILINE)
        found.append(Block(page=page, line=text.count("\n", 0, fence.start()) + 1, lang=fence["lang"].strip(),
                           body=fence["body"], section=headings[-1] if headings else "", marker=marker))
    return found


def bash_blocks() -> list[Block]:
    return [block for page in PAGES for block in blocks(page) if block.lang == "bash"]


def to_run(*, walk: bool) -> list[Block]:
    """The bash blocks the tests run: the cluster walk's, or all the others."""
    return [b for b in bash_blocks() if b.not_run is None and (b.section == WALK_SECTION) == walk]


def test_every_command_block_is_run_or_says_why_not() -> None:
    problems, not_run = [], []
    for page in PAGES:
        for block in blocks(page):
            if block.lang in SHELL_LANGS:
                problems.append(f"{block.id}: ```{block.lang}: write ```bash (run by the tests) or ```text (output)")
            elif block.lang == "" and any(COMMAND_LINE.match(line) for line in block.body.splitlines()):
                problems.append(f"{block.id}: commands in an unlabelled block: label it ```bash, or ```text")
            if block.marker and block.lang != "bash":
                problems.append(f"{block.id}: a marker before a ```{block.lang or '(unlabelled)'} block")
            elif block.marker and block.not_run is None and block.stop_on is None:
                problems.append(f"{block.id}: unknown marker {block.marker!r}")
            if block.not_run is not None:
                not_run.append(block.id)
                if len(block.not_run.split()) < 3:
                    problems.append(f"{block.id}: say why it is not run (a few words), not {block.not_run!r}")
    assert not problems, "\n".join(problems)
    assert len(not_run) <= MAX_NOT_RUN, f"{len(not_run)} blocks are not run ({not_run}); make them runnable"
    assert to_run(walk=True), f"docs/guide.md has no runnable block under '## {WALK_SECTION}'"


def test_the_markers_are_read() -> None:
    page = ROOT / "docs" / "guide.md"
    walk = to_run(walk=True)
    assert walk and all(b.page == page for b in walk)
    assert CTRL_C.search('<!-- runs until stopped: the tests press Ctrl-C once it prints "Server is up" -->')
    assert NOT_RUN.search("<!-- not run by the tests: needs an AWS\n account -->")["reason"] == "needs an AWS\n account"


@functools.cache
def namespace() -> list[str]:
    """The command prefix that runs the blocks in a network and PID namespace of their own, or [] where the
    machine does not allow one (then the docs' ports must be free here, and leftovers are found by mark)."""
    prefix = ["unshare", "--net", "--pid", "--fork", "--kill-child", "--mount-proc"]
    if not (shutil.which("unshare") and shutil.which("ip")):
        return []
    probe = subprocess.run([*prefix, "ip", "link", "set", "lo", "up"], capture_output=True, timeout=60, check=False)
    return prefix if probe.returncode == 0 else []


def workdir(path: Path) -> Path:
    """A folder that looks like this checkout to the docs' commands (`source .venv/bin/activate`,
    deploy/prefect.yaml, ...) but has its own ./artifacts: every top-level entry linked, .venv to this venv."""
    path.mkdir()
    for entry in ROOT.iterdir():
        if entry.name not in LINKED_NOT and not entry.name.endswith(".egg-info"):
            (path / entry.name).symlink_to(entry)
    (path / ".venv").symlink_to(sys.prefix)
    return path


def run_blocks(chosen: list[Block], tmp_path: Path, timeout: float) -> dict:
    """Run ``chosen`` in order (tests/docs/runblocks.py) as a new user on this machine; returns its results."""
    mark, state, home = uuid.uuid4().hex, tmp_path / "state", tmp_path / "home"
    state.mkdir(parents=True)
    home.mkdir()
    keep = {k: v for k, v in os.environ.items()
            if not k.startswith(("RAY_", "PREFECT_", "AWS_", "TRAINFLOW_")) and k != "VIRTUAL_ENV"}
    env = {**keep, "HOME": str(home), "PATH": f"{Path(sys.prefix) / 'bin'}{os.pathsep}{keep.get('PATH', '')}",
           "VIRTUAL_ENV": sys.prefix, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           runblocks.MARK: mark, runblocks.STATE: str(state)}
    prefix = namespace()
    spec = {"blocks": [{"id": b.id, "body": b.body, "stop_on": b.stop_on, "timeout": BLOCK_TIMEOUT_S}
                       for b in chosen],
            "workdir": str(workdir(tmp_path / "work")), "results": str(tmp_path / "results.json"),
            "leftover_grace": 30, "netns": bool(prefix)}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    runner = [sys.executable, str(Path(runblocks.__file__)), str(tmp_path / "spec.json")]
    # in the namespace bash stays its first process (no exec: `; exit`), and reaps the orphans the blocks leave;
    # a process that nobody reaps stays a zombie, which `trainflow down` would wait for as if it still ran
    command = [*prefix, "bash", "-c", f"{shlex.join(runner)}; exit $?"] if prefix else runner
    proc = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()  # with --kill-child, the namespace and everything in it goes too
        out, _ = proc.communicate()
        runblocks.kill_marked(mark)
        raise AssertionError(f"the blocks ran past {timeout:.0f} s:\n{out[-3000:]}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        runblocks.kill_marked(mark)
    print(f"\n{'namespace' if prefix else 'no namespace (unshare not allowed here)'}:\n{out}")
    assert proc.returncode == 0, out[-5000:]
    return json.loads((tmp_path / "results.json").read_text())


def first_failure(results: dict) -> dict | None:
    return next((r for r in results["blocks"] if r["status"] != "ok"), None)


def check(results: dict, chosen: list[Block]) -> None:
    done = results["blocks"]
    if (failed := first_failure(results)) is not None:
        pytest.fail(f"{failed['id']} {failed['status']} (exit {failed['returncode']}, {failed['seconds']} s); "
                    f"the end of its output ({failed['log']}):\n{failed['tail']}", pytrace=False)
    assert [r["id"] for r in done] == [b.id for b in chosen]
    assert not results["left_running"], f"the docs left these running (stop what a block starts): " \
                                        f"{results['left_running']}"


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_readme_then_the_guide_run_as_written(tmp_path: Path) -> None:
    chosen = to_run(walk=False)
    results = run_blocks(chosen, tmp_path, timeout=1700)
    check(results, chosen)


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_the_cluster_walk_completes_all_three_ways(tmp_path: Path) -> None:
    """docs/guide.md's cluster walk as written: two nodes on 127.0.0.2 and SeaweedFS, started by the walk,
    reached by host:port, ray:// and `trainflow submit`, each run spread over both nodes; then stopped."""
    chosen = to_run(walk=True)
    results = run_blocks(chosen, tmp_path / "walk", timeout=700)
    check(results, chosen)
    output = "".join(Path(r["log"]).read_text(errors="replace") for r in results["blocks"])
    assert output.count("run on 2 node(s)") == 3, output[-5000:]  # each run's summary: both nodes trained
    assert re.search(r"trainflow: submitted Ray job \S+ to http://127\.0\.0\.2:8265", output), output[-5000:]
    assert re.search(r"trainflow: Ray job \S+ SUCCEEDED", output), output[-5000:]
