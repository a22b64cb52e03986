#!/usr/bin/env python3
"""How preparing data scales with the images' size and number, as JSON: peak memory, prepared bytes, images/s.

Each case runs ingest + preprocess in a process of its own while this script samples the whole process
tree (the process and every child, e.g. Prefect's temporary server and the decoding pool) ten times a
second. Per case it prints:

    peak_rss_gb   the largest sum over the tree of resident memory (pages shared by forked children
                  count once per process: an upper bound)
    peak_pss_gb   the same with each shared page split between its sharers (what the tree really holds)
    prepared_gb   the prepared dataset's bytes in the store
    decoded_gb    images x size x size x 3: the decoded pixels, as the data path's memory is measured against
    images_per_s  images prepared per second of the preprocess stage alone
    seconds       the case's whole wall time

Cases: the real CIFAR-10 (``--cifar DIR`` of ``train.tar.gz`` and ``test.tar.gz``, default
``$TRAINFLOW_CIFAR10_DIR``) at each ``--sizes``, and ``--synthetic N`` JPEGs of 256x256 prepared at
``--synthetic-size``. ``--via cli`` (the default) runs ``trainflow prepare`` as a user does;
``--via functions`` calls ``tasks.ingest.ingest`` and ``tasks.preprocess.preprocess`` of the checkout
at ``--checkout`` (default this one), so that an older checkout, which has no ``prepare`` command, can be
measured the same way on the same machine in the same command. ``--s3`` uploads the synthetic JPEGs to
a local SeaweedFS (the tests' S3 server) and prepares them from ``folder:s3://…`` instead; each case then
also reports ``driver_cache_mb``, what the preparing process left in its local cache (a copy of the
images, where ingest downloads them).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
STAGE_LINE = re.compile(r"^preprocess\s+([\d.]+) s")
FUNCTIONS = """
import json, sys, time
from pathlib import Path
from tasks.ingest import ingest
from tasks.preprocess import PreprocessConfig, preprocess
dataset, size, store, cache = sys.argv[1], int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
raw = ingest(dataset, cache / "raw")
start = time.perf_counter()
prepared = preprocess(raw, PreprocessConfig(image_size=size), store)
print("preprocess %.1f s" % (time.perf_counter() - start), file=sys.stderr)
print(json.dumps({"counts": prepared.counts, "uri": prepared.uri}))
"""


def tree_memory(root: psutil.Process) -> tuple[int, int]:
    """(sum of RSS, sum of PSS) over ``root`` and its descendants, in bytes."""
    rss = pss = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            info = proc.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        rss += info.rss
        pss += getattr(info, "pss", info.rss)
    return rss, pss


def run_case(command: list[str], cwd: Path, env: dict[str, str]) -> dict:
    """Run ``command`` while sampling its tree's memory; its stdout's JSON and the peaks."""
    peaks = [0, 0]
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = threading.Event()

    def sample() -> None:
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                rss, pss = tree_memory(root)
            except psutil.NoSuchProcess:
                return
            peaks[0], peaks[1] = max(peaks[0], rss), max(peaks[1], pss)
            done.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command[:4])} … failed ({proc.returncode}):\n{stderr[-3000:]}")
    stage = [float(m.group(1)) for line in stderr.splitlines() if (m := STAGE_LINE.match(line.strip()))]
    return {"result": json.loads(stdout[stdout.index("{"):]), "preprocess_s": stage[-1] if stage else None,
            "seconds": round(time.perf_counter() - start, 1), "peak_rss_gb": round(peaks[0] / 1e9, 2),
            "peak_pss_gb": round(peaks[1] / 1e9, 2)}


def synthetic_jpegs(root: Path, count: int, classes: int = 10, side: int = 256) -> Path:
    """``count`` JPEGs of ``side`` x ``side`` in ``classes`` class folders: smooth noise, so that they compress
    about as photos do (tens of kB each)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / f"class_{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 256, (side // 16, side // 16, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((side, side), Image.Resampling.BICUBIC)
        image.save(folder / f"{i:06d}.jpg", quality=90)
    return root


def measure(dataset: str, size: int, args: argparse.Namespace, work: Path) -> dict:
    store, cache = work / f"store-{size}", work / "cache"
    env = {**os.environ, "TRAINFLOW_CACHE_DIR": str(cache), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    if args.via == "cli":
        command = [sys.executable, "-m", "flows.cli", "prepare", "--dataset", dataset, "--image-size", str(size),
                   "--store", str(store), "--json"]
    else:
        command = [sys.executable, "-c", FUNCTIONS, dataset, str(size), str(store), str(cache)]
    case = run_case(command, args.checkout, {**env, "PYTHONPATH": str(args.checkout)})
    if args.s3:
        case["driver_cache_mb"] = round(sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()) / 1e6, 1)
    counts = case.pop("result")["counts"]
    images = sum(counts.values())
    prepared_bytes = sum(p.stat().st_size for p in (store / "prepared").rglob("*") if p.is_file())
    shutil.rmtree(store)
    seconds = case.pop("preprocess_s")
    return {"dataset": dataset.split("/")[-1], "image_size": size, "images": images,
            "decoded_gb": round(images * size * size * 3 / 1e9, 2), "prepared_gb": round(prepared_bytes / 1e9, 2),
            "images_per_s": round(images / seconds) if seconds else None, **case}


def measure_on_s3(folder: Path, args: argparse.Namespace, work: Path) -> dict:
    """The synthetic case from a local SeaweedFS: uploaded first (not timed), prepared from ``folder:s3://``."""
    from concurrent.futures import ThreadPoolExecutor

    sys.path.insert(0, str(ROOT))
    from tests import s3server

    server = s3server.start(work / "s3")
    try:
        os.environ.update(server.env())  # the preparing process finds the server as a user's would
        client = server.client()
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda p: client.upload_file(str(p), server.bucket, f"synthetic/{p.relative_to(folder)}"),
                          files))
        return measure(f"folder:s3://{server.bucket}/synthetic", args.synthetic_size, args, work)
    finally:
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cifar", type=Path, default=os.environ.get("TRAINFLOW_CIFAR10_DIR"))
    ap.add_argument("--sizes", type=int, nargs="*", default=[32, 64, 128])
    ap.add_argument("--synthetic", type=int, default=20_000, help="JPEGs of 256x256 (0: none)")
    ap.add_argument("--synthetic-size", type=int, default=224)
    ap.add_argument("--via", choices=("cli", "functions"), default="cli")
    ap.add_argument("--checkout", type=Path, default=ROOT, help="the checkout whose code prepares")
    ap.add_argument("--s3", action="store_true", help="prepare the synthetic JPEGs from a local S3 server")
    args = ap.parse_args()
    args.checkout = args.checkout.resolve()
    rows = []
    with tempfile.TemporaryDirectory(prefix="data-scale-") as tmp:
        work = Path(tmp)
        if args.cifar:
            for size in args.sizes:
                rows.append(measure(f"folder:{Path(args.cifar).resolve()}", size, args, work))
                print(json.dumps(rows[-1]), file=sys.stderr)
        if args.synthetic:
            folder = synthetic_jpegs(work / "synthetic", args.synthetic)
            if args.s3:
                rows.append(measure_on_s3(folder, args, work))
            else:
                rows.append(measure(f"folder:{folder}", args.synthetic_size, args, work))
    print(json.dumps({"checkout": str(args.checkout), "via": args.via, "cpus": os.cpu_count(), "cases": rows},
                     indent=2))


if __name__ == "__main__":
    main()
