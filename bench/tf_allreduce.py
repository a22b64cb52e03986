#!/usr/bin/env python3
"""TensorFlow's cross-worker all-reduce alone, by the dtype on the wire, as JSON.

Two plain processes on this machine (``TF_CONFIG`` on 127.0.0.1, no Ray), each a
``MultiWorkerMirroredStrategy`` worker set up as the training loop sets one up
(one intra-op thread, two inter-op threads, one 64 MB pack), sum a vector of
``--elements`` values (default: the article CNN's parameters at 32 px, one
step's gradients) ``--repeats`` times per dtype. Rank 0 prints milliseconds per
all-reduce and each dtype's time as a share of float32's, measured in the same
processes, one after the other::

    python bench/tf_allreduce.py                 # float32, float16, bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARTICLE_CNN_PARAMETERS_32PX = 5_100_000
DTYPES = ("float32", "float16", "bfloat16")


def worker(rank: int, ports: list[int], elements: int, repeats: int) -> dict[str, float]:
    """One worker's side; returns milliseconds per all-reduce by dtype (the same on both ranks)."""
    os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                                          "task": {"type": "worker", "index": rank}})
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(2)
    options = tf.distribute.experimental.CommunicationOptions(bytes_per_pack=64 << 20)
    strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    found = {}
    for name in DTYPES:
        values = tf.ones([elements], getattr(tf, name))

        @tf.function
        def all_reduce(v):
            # tf.identity places the value on the replica's device (as the loop's own all-reduce does)
            return strategy.run(lambda t: tf.distribute.get_replica_context().all_reduce(
                tf.distribute.ReduceOp.SUM, tf.identity(t)), args=(v,))

        for _ in range(3):  # tracing and the collective's first round
            all_reduce(values)
        started = time.perf_counter()
        for _ in range(repeats):
            summed = all_reduce(values)
        strategy.experimental_local_results(summed)[0].numpy()  # wait for the last one
        found[name] = (time.perf_counter() - started) / repeats * 1000
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=int, default=ARTICLE_CNN_PARAMETERS_32PX)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)  # the second process
    parser.add_argument("--ports", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if args.rank is not None:
        worker(args.rank, [int(p) for p in args.ports.split(",")], args.elements, args.repeats)
        return

    from cluster.ports import free_ports

    ports = free_ports(2)
    peer = subprocess.Popen([sys.executable, __file__, "--rank", "1", "--ports", ",".join(map(str, ports)),
                             "--elements", str(args.elements), "--repeats", str(args.repeats)], cwd=ROOT)
    try:
        ms = worker(0, ports, args.elements, args.repeats)
    finally:
        peer.wait(timeout=120)
    print(json.dumps({"elements": args.elements, "repeats": args.repeats,
                      "ms_per_all_reduce": {k: round(v, 1) for k, v in ms.items()},
                      "share_of_float32": {k: round(v / ms["float32"], 3) for k, v in ms.items()}}, indent=2))


if __name__ == "__main__":
    main()
