"""Training step: sharding=none (replicated data parallel) vs fsdp2 on 2 gloo ranks, fp32 vs bf16 compute.

For each size, layout and precision, 2 ranks (torch.multiprocessing, gloo, no Ray) run `--steps`
train steps on the same global batch after one warm-up step; printed: median step seconds, and what
one rank holds (parameters, gradients, AdamW state: local shards) with the ratios fsdp2/none and
bf16/fp32. One thread per rank.

    .venv/bin/python benchmarks/train_step.py [--sizes tiny 100m] [--rows 8] [--length 128] [--steps 3]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import SIZES, machine_line, median, table  # noqa: E402

import model  # noqa: E402
from engine.config import OptimConfig, TrainConfig  # noqa: E402
from engine.train import TrainWorker, even_slices, split_rows  # noqa: E402


def factory(size: str):
    return model.build("tiny", seed=0, **SIZES[size])


def loss_fn(fwd, mb):
    return fwd.token_mean(-fwd.logp), {}


def rank_main(rank: int, world: int, port: int, size: str, sharding: str, precision: str, rows: int, length: int,
              steps: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    import functools
    w = TrainWorker(functools.partial(factory, size), optim=OptimConfig(lr=1e-5, micro_batch_size=rows // world),
                    train=TrainConfig(world_size=world, sharding=sharding, mixed_precision=precision), rank=rank,
                    world_size=world)
    w.init_distributed("127.0.0.1", port)
    rng = np.random.default_rng(0)
    vocab = w.unwrapped.config.vocab_size
    batch = {"input_ids": rng.integers(3, vocab, size=(rows, length)), "attention_mask": np.ones((rows, length))}
    shard = split_rows(batch, even_slices(rows, world))[rank]
    times = []
    for i in range(steps + 1):
        t = time.perf_counter()
        w.train_step(shard, loss_fn)
        times.append(time.perf_counter() - t)
    if rank == 0:
        Path(out).write_text(json.dumps({"seconds": median(times[1:]), **w.held_bytes()}))
    w.shutdown()


def run(size, sharding, precision, args) -> dict:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        torch.multiprocessing.spawn(rank_main, args=(2, port, size, sharding, precision, args.rows, args.length,
                                                     args.steps, f.name), nprocs=2, join=True)
        return json.loads(Path(f.name).read_text())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", nargs="+", default=["tiny", "100m"])
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    print(machine_line())
    print(f"2 gloo ranks, 1 thread each; global batch {args.rows} x {args.length} tokens; median of {args.steps} steps")
    rows = []
    for size in args.sizes:
        res = {(s, pr): run(size, s, pr, args) for s in ("none", "fsdp2") for pr in ("no", "bf16")}
        for (s, pr), r in res.items():
            base, fp32 = res[("none", pr)], res[(s, "no")]
            mb = sum(r[k] for k in ("params", "grads", "optimizer")) / 1e6
            base_mb = sum(base[k] for k in ("params", "grads", "optimizer")) / 1e6
            rows.append([size, s, pr, f"{r['seconds']:.3f}", f"{r['seconds'] / fp32['seconds']:.2f}",
                         f"{r['seconds'] / base['seconds']:.2f}", f"{r['params'] / 1e6:.1f}", f"{r['grads'] / 1e6:.1f}",
                         f"{r['optimizer'] / 1e6:.1f}", f"{mb / base_mb:.2f}"])
    print(table(["size", "sharding", "compute", "step s", "vs fp32", "vs none", "params MB/rank", "grads MB/rank",
                 "AdamW MB/rank", "bytes vs none"], rows))


if __name__ == "__main__":
    main()
