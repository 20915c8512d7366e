"""Training step, side by side, one suite per run (--suite):

- sharding (default): sharding=none (replicated data parallel) vs fsdp2 on 2 gloo ranks, fp32 vs bf16 compute;
- ep: fsdp2 vs fsdp2 + expert parallelism (ep_size 2) on 2 gloo ranks, fp32;
- grouped: routed experts as grouped GEMM (torch._grouped_mm) vs the per-expert loop, one process (1 rank);
- packing: padded rows (micro_batch_size) vs token-budget packing (micro_batch_tokens = the same rows x T)
  on a GRPO-like batch: prompts of 32-64 tokens, completion lengths log-normal (median ~T/5, a tail
  cut at max_tokens), one process.

Each run does `--steps` train steps on the same global batch after one warm-up step; printed: median
step seconds, tokens forwarded (packing), and what one rank holds (parameters, gradients, AdamW state:
local shards), with ratios against the first row of each size. 2-rank suites: one thread per rank.

    .venv/bin/python benchmarks/train_step.py [--suite sharding|ep|grouped|packing] [--sizes tiny 100m]
                                              [--rows 8] [--length 128] [--steps 3]
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
from engine.train import TrainWorker, even_slices, expert_parallel, sharding, split_rows  # noqa: E402


def factory(size: str):
    return model.build("tiny", seed=0, **SIZES[size])


def loss_fn(fwd, mb):
    return fwd.token_mean(-fwd.logp), {}


def grouped_factory(size: str, grouped: bool):
    from model.moe import RoutedExperts

    net = factory(size)
    for m in net.modules():
        if isinstance(m, RoutedExperts):
            m.grouped = grouped
    return net


def full_batch(vocab: int, rows: int, length: int) -> dict:
    rng = np.random.default_rng(0)
    return {"input_ids": rng.integers(3, vocab, size=(rows, length)), "attention_mask": np.ones((rows, length))}


def grpo_batch(vocab: int, rows: int, length: int) -> dict:
    """Left-padded prompts (32-64 tokens), completions log-normal in length (median length/5), cut at the rest."""
    rng = np.random.default_rng(0)
    prompt = rng.integers(32, 65, size=rows)
    completion = np.minimum(rng.lognormal(np.log(length / 5), 0.8, size=rows).astype(int) + 1, length - prompt)
    attn = np.zeros((rows, length), dtype=np.int64)
    loss = np.zeros((rows, length), dtype=np.float32)
    for r in range(rows):
        pad = length - prompt[r] - completion[r]
        attn[r, pad:] = 1
        loss[r, pad + prompt[r]:] = 1
    ids = np.where(attn == 1, rng.integers(3, vocab, size=(rows, length)), 0)
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}


def timed_steps(w: TrainWorker, shard: dict, steps: int) -> float:
    times = []
    for _ in range(steps + 1):
        t = time.perf_counter()
        w.train_step(shard, loss_fn)
        times.append(time.perf_counter() - t)
    return median(times[1:])


def rank_main(rank: int, world: int, port: int, size: str, train: dict, rows: int, length: int,
              steps: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    import functools
    w = TrainWorker(functools.partial(factory, size), optim=OptimConfig(lr=1e-5, micro_batch_size=rows // world),
                    train=TrainConfig(world_size=world, **train), rank=rank, world_size=world)
    w.init_distributed("127.0.0.1", port)
    shard = split_rows(full_batch(w.unwrapped.config.vocab_size, rows, length), even_slices(rows, world))[rank]
    unsharded = [0]                                     # routed-expert bytes a MoE layer holds while it computes

    def hook(m, *_):
        unsharded[0] = max(unsharded[0], sum(sharding.local(p).numel() * p.element_size() for p in m.parameters()))
    for m in expert_parallel.routed_experts(w.unwrapped):
        m.register_forward_pre_hook(hook)
    seconds = timed_steps(w, shard, steps)
    if rank == 0:
        Path(out).write_text(json.dumps({"seconds": seconds, "experts_unsharded": unsharded[0], **w.held_bytes()}))
    w.shutdown()


def run(size, train: dict, args) -> dict:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        torch.multiprocessing.spawn(rank_main, args=(2, port, size, train, args.rows, args.length,
                                                     args.steps, f.name), nprocs=2, join=True)
        return json.loads(Path(f.name).read_text())


def run_local(size: str, args, grouped: bool = True, budget: int | None = None) -> dict:
    """One process, the whole batch: grouped GEMM or the loop; padded rows (4 per micro-batch) or packed."""
    import functools
    optim = OptimConfig(lr=1e-5, micro_batch_size=None if budget else 4)
    w = TrainWorker(functools.partial(grouped_factory, size, grouped), optim=optim,
                    train=TrainConfig(micro_batch_tokens=budget))
    vocab = w.unwrapped.config.vocab_size
    batch = grpo_batch(vocab, args.rows, args.length) if args.suite == "packing" else \
        full_batch(vocab, args.rows, args.length)
    mbs = w._micro_batches(batch)
    tokens = sum(int(np.asarray(mb["input_ids"]).size) for mb in mbs)
    return {"seconds": timed_steps(w, batch, args.steps), "tokens": tokens, "micro_batches": len(mbs),
            "valid": int(np.asarray(batch["attention_mask"]).sum()), **w.held_bytes()}


def mb(r: dict) -> float:
    return sum(r[k] for k in ("params", "grads", "optimizer")) / 1e6


def other_suite(args) -> None:
    rows = []
    for size in args.sizes:
        if args.suite == "ep":
            res = {"fsdp2": run(size, dict(sharding="fsdp2"), args),
                   "fsdp2 + ep 2": run(size, dict(sharding="fsdp2", ep_size=2), args)}
        elif args.suite == "grouped":
            res = {"loop": run_local(size, args, grouped=False), "grouped GEMM": run_local(size, args, grouped=True)}
        else:
            budget = 4 * args.length                       # the padded micro-batch's token count
            res = {"padded, 4 rows/mb": run_local(size, args), f"packed, {budget} tokens/mb": run_local(size, args, budget=budget)}
        base = next(iter(res.values()))
        for name, r in res.items():
            rows.append([size, name, f"{r['seconds']:.3f}", f"{r['seconds'] / base['seconds']:.2f}",
                         str(r.get("tokens", "")), str(r.get("micro_batches", "")), f"{r['params'] / 1e6:.1f}",
                         f"{r['grads'] / 1e6:.1f}", f"{r['optimizer'] / 1e6:.1f}", f"{mb(r) / mb(base):.2f}",
                         f"{r['experts_unsharded'] / 1e6:.2f}" if "experts_unsharded" in r else ""])
        if args.suite == "packing":
            print(f"{size}: {base['valid']} valid tokens in {args.rows} rows x {args.length}")
    print(table(["size", args.suite, "step s", "vs first", "tokens run", "micro-batches", "params MB/rank",
                 "grads MB/rank", "AdamW MB/rank", "bytes vs first", "experts MB/layer in compute"], rows))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", nargs="+", default=["tiny", "100m"])
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--suite", choices=["sharding", "ep", "grouped", "packing"], default="sharding")
    args = p.parse_args()
    print(machine_line())
    torch.set_num_threads(1)                           # as the 2-rank suites' ranks (2 busy cores: steadier)
    ranks = "2 gloo ranks, 1 thread each" if args.suite in ("sharding", "ep") else "1 process, 1 thread"
    print(f"{ranks}; global batch {args.rows} x {args.length} tokens; median of {args.steps} steps")
    if args.suite != "sharding":
        return other_suite(args)
    rows = []
    for size in args.sizes:
        res = {(s, pr): run(size, dict(sharding=s, mixed_precision=pr), args) for s in ("none", "fsdp2")
               for pr in ("no", "bf16")}
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
