"""The docs stay a user's docs: a short README, links that resolve, no figures in the code's prose, no issue numbers.

Measured figures belong in docs/performance.md (date, commit, machine, command); docstrings and comments keep
the reasoning and point there. These checks read files only: no servers, no imports of the project.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
MARKDOWN = [README, *DOCS]
README_MAX_LINES = 200

# Folders whose docstrings and comments must hold no measured figure.
CODE_DIRS = ("cluster", "tasks", "flows", "bench")
# TODO(owner): remove exclusion once cleaned
FIGURES_NOT_CHECKED_YET = ("flows",)

_NUMBER = r"\d(?:[\d.,\u00a0\u202f]|\s(?=\d))*"  # 12, 0.941, 1 126, 2 003.3
FIGURE_PATTERNS = [
    re.compile(p, re.IGNORECASE) for p in (
        rf"{_NUMBER}\s*(?:images|imgs?|samples|steps|tokens)/s\b",  # throughput
        rf"{_NUMBER}\s*(?:ms|µs)\b",  # step and call timings
        (rf"{_NUMBER}\s*(?:s|seconds?|minutes?)\b[^.;\n]{{0,60}}"  # wall times tied to a machine
         r"(?:\b(?:\d|two|four)[- ](?:cpu[- ])?cores?\b|reference machine)"),
        r"\b(?:ddp_efficiency\w*|ray_overhead|ratio_vs_\w+)`?\s*(?:of|was|=|:)?\s*\d\.\d",  # make bench's ratios
        r"\b0\.\d{3,}\s+(?:test\s+)?accuracy\b",  # a measured accuracy
    )
]
ISSUE_PATTERNS = [
    re.compile(r"\bissues?\s+#?\d+\b", re.IGNORECASE),  # "issue 10", "issues 7"
    re.compile(r"(?<![\w/.-])#\d+\b"),  # "#30"; an upstream "keras-team/keras#20585" is fine
]


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def _fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(info string, body) of each fenced code block."""
    return re.findall(r"^```([^\n`]*)\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)


def _prose(text: str) -> str:
    """Markdown without its fenced blocks and inline code spans, where a link is not a link."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
    return re.sub(r"`[^`\n]*`", "", text)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    found: set[str] = set()
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.MULTILINE | re.DOTALL)
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, flags=re.MULTILINE):
        slug, n = _slug(heading), 1
        while slug in found:  # GitHub numbers repeated headings: name, name-1, name-2, ...
            slug, n = f"{_slug(heading)}-{n}", n + 1
        found.add(slug)
    return found


def _links(path: Path) -> list[str]:
    return re.findall(r"\[[^\]]*\]\(\s*([^)\s]+)(?:\s+\"[^\"]*\")?\s*\)", _prose(path.read_text(encoding="utf-8")))


def _code_prose(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every comment and every module, class and function docstring of a Python file."""
    source = path.read_text(encoding="utf-8")
    found = [(tok.start[0], tok.string) for tok in tokenize.generate_tokens(io.StringIO(source).readline)
             if tok.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node, clean=False)
            if doc is not None:
                found += [(node.body[0].lineno + i, line) for i, line in enumerate(doc.splitlines())]
    return found


def figures_in(text: str) -> list[str]:
    """The measured figures a piece of prose quotes."""
    return [m.group(0) for pattern in FIGURE_PATTERNS for m in pattern.finditer(text)]


def issue_references(text: str) -> list[str]:
    return [m.group(0) for pattern in ISSUE_PATTERNS for m in pattern.finditer(text)]


def test_readme_is_short_and_starts_with_the_two_commands() -> None:
    lines = _lines(README)
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move reference text into docs/"
    commands = [[line.split("#")[0].strip() for line in body.splitlines()]
                for info, body in _fenced_blocks(README.read_text(encoding="utf-8")) if info.strip() == "bash"]
    assert any({"make run", "make test"} <= set(block) for block in commands), \
        "README.md needs one ```bash block holding `make run` and `make test`"


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: p.name)
def test_relative_links_resolve(path: Path) -> None:
    broken = []
    for link in _links(path):
        if re.match(r"[a-z][a-z0-9+.-]*:", link, flags=re.IGNORECASE):  # http:, https:, mailto:
            continue
        target, _, anchor = link.partition("#")
        file = (path.parent / target).resolve() if target else path
        if not file.exists():
            broken.append(f"{link} (no file {file.relative_to(ROOT) if file.is_relative_to(ROOT) else file})")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"{link} (no heading #{anchor} in {file.name})")
    assert not broken, f"{path.name}: broken links: {broken}"


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: p.name)
def test_no_issue_numbers_in_the_docs(path: Path) -> None:
    found = issue_references(path.read_text(encoding="utf-8"))
    assert not found, f"{path.name} refers to this project's issues: {found}; say what the behaviour is instead"


def test_no_measured_figures_in_docstrings_or_comments() -> None:
    found = []
    for folder in CODE_DIRS:
        if folder in FIGURES_NOT_CHECKED_YET:
            continue
        for path in sorted((ROOT / folder).rglob("*.py")):
            for line, text in _code_prose(path):
                found += [f"{path.relative_to(ROOT)}:{line}: {figure!r}" for figure in figures_in(text)]
    assert not found, "measured figures belong in docs/performance.md (with date, commit, machine and command), " \
                      "not in the code; point there instead:\n" + "\n".join(found)


@pytest.mark.parametrize("text", [
    "1 126 and 1 129 images/s against DDP", "took 5.5 to 8.1 ms of a 57 ms step", "575.5 img/s fp32",
    "takes 0.8 s on a 2-core machine", "a `ddp_efficiency` of 0.82", "reached 0.9003 test accuracy",
    "638 s on the reference machine",
])
def test_the_figure_check_sees_figures(text: str) -> None:
    assert figures_in(text)


@pytest.mark.parametrize("text", [
    "logs every 30 s while it waits", "after a 0.5 s sleep", "measured with Ray 2.60", "see docs/performance.md",
    "images/s per mode", "batch 64 over 2 workers", "(2^17 elements)", "sha256 of a file, read in 1 MiB blocks",
])
def test_the_figure_check_leaves_plain_numbers(text: str) -> None:
    assert not figures_in(text)


@pytest.mark.parametrize(("text", "found"), [
    ("the 90 % that issue 11 asks for", True), ("fixed in #30", True), ("(keras-team/keras#20585)", False),
    ("[a link](guide.md#cluster-walk)", False), ("4 issues left", False),
])
def test_the_issue_check(text: str, found: bool) -> None:
    assert bool(issue_references(text)) is found
