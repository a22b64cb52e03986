#!/usr/bin/env python3
"""Training throughput of trainflow's per-worker loop against the plain-PyTorch yardstick.

On the same fixed 5 000-image CIFAR-10 subset (``random.Random(0).sample``
over the sorted file list, as ``../shared/bench/baseline_torch.py --limit``
draws it), seed CNN, global batch 64, one epoch, one process, this runs:

* the baseline with ``--loader memory``: fp32 eager compute with no input
  pipeline at all, the floor;
* the baseline with ``--loader folder``: the article's ImageFolder/DataLoader;
* trainflow's loop (``python -m cluster.torch_loop``) on the prepared arrays,
  in its default fp32 mode and in its fastest mode (bf16 autocast +
  channels_last);
* trainflow's TensorFlow loop (``python -m cluster.tf_loop``) on the same
  arrays, same model and batch, fp32 (skipped when TensorFlow is not installed).

Each is a separate process, measured ``--repeats`` times in alternation; the
best run of each counts. Prints one JSON object; ratios are throughput ratios
(higher is better):

    ratio_vs_floor        trainflow fp32 default / baseline memory loader
    ratio_vs_seed_loader  trainflow fastest mode / baseline folder loader
    ratio_tensorflow_vs_torch  trainflow TensorFlow fp32 / trainflow torch fp32
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.ingest import ingest  # noqa: E402
from tasks.preprocess import PreprocessConfig, preprocess  # noqa: E402
from tasks.store import open_store  # noqa: E402

SUBSET = 5000
TENSORFLOW = "trainflow_tensorflow_fp32"
MODES = {
    "trainflow_fp32": [],
    "trainflow_bf16_channels_last": ["--precision", "bf16", "--channels-last"],
}


def run(cmd: list[str]) -> dict:
    """Run one measurement; its last JSON line on stdout is the result."""
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "2"}
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1800, env=env)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"benchmark step failed: {' '.join(cmd)}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


def prepare(cifar: Path, work: Path) -> tuple[Path, Path]:
    """Unpack CIFAR-10 once; return (folder with train/ and test/ for the baseline, prepared arrays)."""
    raw = ingest(f"folder:{cifar}", work / "cache")
    layout = work / "folders"
    layout.mkdir(exist_ok=True)
    for split, directory in raw.splits.items():
        link = layout / split
        if not link.exists():
            link.symlink_to(directory)
    cfg = PreprocessConfig(image_size=32, val_fraction=0.0, limit_train=SUBSET, seed=0)
    prepared = preprocess(raw, cfg, str(work / "store"))
    store = open_store(str(work / "store"))
    return layout, store.local_dir(store.key_of(prepared.uri), work)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_cifar = os.environ.get("TRAINFLOW_CIFAR10_DIR", str(ROOT.parent / "shared/datasets/cifar10-jpeg"))
    ap.add_argument("--cifar", type=Path, default=Path(default_cifar), help="folder with train.tar.gz, test.tar.gz")
    ap.add_argument("--baseline", type=Path, default=ROOT.parent / "shared/bench/baseline_torch.py")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="trainflow-bench-") as tmp:
        work = args.work or Path(tmp)
        folders, data = prepare(args.cifar, work)
        commands = {
            "baseline_memory": [sys.executable, str(args.baseline), str(folders), "--loader", "memory",
                                "--limit", str(SUBSET)],
            "baseline_folder": [sys.executable, str(args.baseline), str(folders), "--loader", "folder",
                                "--limit", str(SUBSET)],
            **{name: [sys.executable, "-m", "cluster.torch_loop", "--data", str(data), "--epochs", "1", *extra]
               for name, extra in MODES.items()},
        }
        if importlib.util.find_spec("tensorflow") is not None:
            commands[TENSORFLOW] = [sys.executable, "-m", "cluster.tf_loop", "--data", str(data), "--epochs", "1"]
        runs: dict[str, list[float]] = {name: [] for name in commands}
        for repeat in range(args.repeats):
            for name, cmd in commands.items():
                if name in (*MODES, TENSORFLOW):  # a fresh checkpoint folder, or the loop would resume past its epoch
                    cmd = [*cmd, "--checkpoints", str(work / f"ckpt-{name}-{repeat}")]
                runs[name].append(run(cmd)["train_images_per_s"])

    best = {name: max(values) for name, values in runs.items()}
    fastest = max(MODES, key=best.__getitem__)
    print(json.dumps({
        "images": SUBSET, "batch_size": 64, "epochs": 1, "repeats": args.repeats,
        "images_per_s": {name: round(v, 1) for name, v in best.items()},
        "all_runs": {name: [round(v, 1) for v in values] for name, values in runs.items()},
        "fastest_mode": fastest,
        "ratio_vs_floor": round(best["trainflow_fp32"] / best["baseline_memory"], 3),
        "ratio_vs_seed_loader": round(best[fastest] / best["baseline_folder"], 3),
        "ratio_tensorflow_vs_torch": (round(best[TENSORFLOW] / best["trainflow_fp32"], 3)
                                      if TENSORFLOW in best else None),
        "torch_threads": int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)),
    }, indent=2))


if __name__ == "__main__":
    main()
