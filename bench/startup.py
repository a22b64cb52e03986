#!/usr/bin/env python3
"""Where a local ``trainflow run`` spends the time that is not training, as JSON.

Runs ``trainflow run --preset digits-quickstart --json`` (or the preset and
options given after ``--``) ``--repeats`` times, each on a fresh cache and
store, and timestamps the progress lines the CLI prints when its output is
not a terminal. Per run it reports:

    wall              process start to exit, as the caller sees it
    epochs            the sum of the epochs' own times (the summary's training_seconds)
    fixed_overhead    wall - epochs: what a run costs besides training
    first_step        process start to the moment the CLI hears of the first
                      training step (its first progress event: where a
                      terminal's epoch bar first moves)
    first_epoch_start epoch 1's line minus that epoch's seconds: the start of
                      the first step as the epoch report tells it, plus the
                      epoch's evaluation, checkpoint and report delivery
                      (which polls: 0-0.75 s)
    phases            start (process start to the first stage's end, less that
                      stage), each stage's seconds, train_overhead (the train
                      stage less its epochs) and exit (the summary to the
                      process's end)

and the median of each over the runs. ``--warm`` says the runs are meant to
find ``trainflow up``'s services; the runs print whether they did.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGE_LINE = re.compile(r"^(ingest|preprocess|train|evaluate|publish)\s+([\d.]+) s")
EPOCH_LINE = re.compile(r"^epoch (\d+)/\d+: .*\(([\d.]+)s, ")
FIRST_STEP_LINE = "bench: first step heard"
# `trainflow run` as its console script runs it, with one listener more: it prints a line when the first
# training step's progress event reaches the process (for a run whose output is not a terminal, the
# console prints nothing then)
CLI = f"""
import os
from flows.cli import console_main
from tasks.events import listening

heard = []

def first_step(kind, fields):
    if kind == "epoch_progress" and not heard:
        heard.append(True)
        os.write(2, {FIRST_STEP_LINE!r}.encode() + b"\\n")  # not print(): the flow logs what it prints

with listening(first_step):
    console_main()
"""


def timed_lines(stream, into: list[tuple[float, str]]) -> None:
    for line in stream:
        into.append((time.perf_counter(), line.rstrip("\n")))


def one_run(command: list[str], workdir: Path) -> dict:
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(target=timed_lines, args=(proc.stderr, lines))
    reader.start()
    stdout = proc.stdout.read()
    code = proc.wait()
    end = time.perf_counter()
    reader.join()
    if code != 0:
        raise SystemExit(f"run failed ({code}):\n" + "\n".join(line for _, line in lines[-40:]))
    summary = json.loads(stdout[stdout.index("{"):])
    stages = {m[1]: (t - start, float(m[2])) for t, line in lines if (m := STAGE_LINE.match(line))}
    epochs = [(t - start, float(m[2])) for t, line in lines if (m := EPOCH_LINE.match(line))]
    first_at, first_seconds = stages[next(iter(stages))]
    phases = {"start": first_at - first_seconds, **{name: seconds for name, (_, seconds) in stages.items()}}
    phases["train_overhead"] = phases["train"] - summary["training_seconds"]
    phases["exit"] = (end - start) - max(at for at, _ in stages.values())
    heard = [t - start for t, line in lines if line == FIRST_STEP_LINE]
    notes = [line for _, line in lines
             if not STAGE_LINE.match(line) and not EPOCH_LINE.match(line) and line != FIRST_STEP_LINE]
    return {"wall": end - start, "epochs": summary["training_seconds"],
            "fixed_overhead": end - start - summary["training_seconds"],
            "first_step": heard[0] if heard else None,
            "first_epoch_start": epochs[0][0] - epochs[0][1] if epochs else None,
            "phases": {k: round(v, 2) for k, v in phases.items()}, "notes": notes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warm", action="store_true", help="label: the runs are meant to use `trainflow up`'s services")
    ap.add_argument("run_args", nargs="*", help="trainflow run's options (default: --preset digits-quickstart)")
    args = ap.parse_args()
    run_args = args.run_args or ["--preset", "digits-quickstart"]
    runs = []
    for _ in range(args.repeats):
        workdir = Path(tempfile.mkdtemp(prefix="trainflow-startup-"))
        try:
            command = [sys.executable, "-c", CLI, "run", *run_args, "--json",
                       "--store", str(workdir / "artifacts")]
            runs.append(one_run(command, ROOT))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    keys = ("wall", "epochs", "fixed_overhead", "first_step", "first_epoch_start")
    median = {k: round(statistics.median(r[k] for r in runs), 2) for k in keys if all(r[k] is not None for r in runs)}
    median["phases"] = {k: round(statistics.median(r["phases"][k] for r in runs), 2) for k in runs[0]["phases"]}
    print(json.dumps({"mode": "warm" if args.warm else "cold", "run_args": run_args, "median": median,
                      "runs": [{k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()} for r in runs]},
                     indent=2))


if __name__ == "__main__":
    main()
