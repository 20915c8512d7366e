"""Full fine-tuning vs LoRA GRPO, side by side: step time, bytes synced per step, per-rank memory, reward.

For each size (tiny = the preset's shapes, 100m = 100M), two measurements, full fine-tuning vs LoRA
(r, alpha = 2r; attention + routed experts), LoRA with its own (higher) LR:
1. the trainer's side of a GRPO step in one process, the two interleaved (so machine load hits both
   alike): reference log-probs + one train step (median of --repeats after a warm-up), and building the
   refit payload (full weights vs adapter factors) with its bytes;
2. the same GRPO recipe through `align grpo`'s code path (run_grpo: Ray, one training rank, the native
   rollout engine, beta > 0), each mode in a fresh subprocess: median GRPO step seconds (steps 2..N, this
   includes rollout and is at the mercy of the machine's load), refit/bytes per step, the training
   actor's peak RSS, and the training reward at step 1 and step N.
Also what one training rank holds by account (fp32 params + grads + AdamW state + the reference copy;
LoRA: grads and AdamW state of the adapters only, no reference). Then the LoRA/full ratios.

    .venv/bin/python benchmarks/lora.py [--sizes tiny 100m] [--steps 8 3] [--r 8]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))
from _common import TreeRSS, machine_line, make_checkpoint, median, param_summary, table  # noqa: E402


def write_prompts(path: Path, n: int = 16) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"Count to {i % 7 + 2}:"}) + "\n")
    return path


def one_run(a) -> None:
    """In the subprocess: run_grpo, then write result.json (per-step metrics and the accounted bytes)."""
    from align.data.loading import DataSource
    from align.grpo.config import GRPOConfig
    from align.grpo.loop import run_grpo
    from engine.config import ClusterConfig, EngineConfig, LoraConfig, OptimConfig, RolloutConfig
    from engine.sampling import SamplingConfig
    from engine.train.lora import count_for
    from model.checkpoint import load_config
    from rewards.combine import RewardComponent

    work = Path(a.work)
    lora = LoraConfig(r=a.r, alpha=2 * a.r) if a.mode == "lora" else None
    cfg = GRPOConfig(
        init_from=a.ckpt, data=[DataSource(source=str(write_prompts(work / "prompts.jsonl")))],
        rewards=[RewardComponent(spec="_common:brevity")], steps=a.steps, prompts_per_step=4, group_size=4,
        beta=0.04, seed=0, sampling=SamplingConfig(temperature=1.0, max_tokens=16), lora=lora,
        engine=EngineConfig(cluster=ClusterConfig(num_cpus=2, rollout_num_cpus=2, train_num_cpus=2),
                            rollout=RolloutConfig(backend="native"),
                            optim=OptimConfig(lr=a.lora_lr if lora else a.lr, max_grad_norm=1.0)))
    run_grpo(cfg, work / "run")
    recs = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    import model
    P = sum(p.numel() for p in model.from_pretrained(a.ckpt).parameters())
    A = count_for(load_config(a.ckpt), lora) if lora else 0
    trained = A or P
    held = {"params": 4 * (P + A), "grads": 4 * trained, "optimizer": 8 * trained, "reference": 0 if lora else 4 * P}
    (work / "result.json").write_text(json.dumps({"steps": recs, "held": held, "adapter_params": A, "params": P}))


def trainer_times(ckpt: Path, a, rows: int = 16, length: int = 48) -> dict[str, dict]:
    """Reference log-probs + train step, and the refit payload, full vs LoRA interleaved in this process."""
    import functools
    import time

    import numpy as np
    import torch

    import model
    from engine.config import LoraConfig, OptimConfig, TrainConfig
    from engine.train import TrainWorker

    def loss_fn(fwd, mb):                                  # GRPO-shaped: -A * logp + 0.04 * k3 KL
        d = mb["ref_logp"] - fwd.logp
        return fwd.token_mean(-fwd.logp * mb["adv"][:, None] + 0.04 * (torch.exp(d) - d - 1)), {}

    fac = functools.partial(model.from_pretrained, str(ckpt))
    workers = {"full": (TrainWorker(fac, fac, OptimConfig(lr=a.lr), TrainConfig(reference=True)), "full"),
               "lora": (TrainWorker(fac, fac, OptimConfig(lr=a.lora_lr),
                                    TrainConfig(reference=True, lora=LoraConfig(r=a.r, alpha=2 * a.r))), "adapter")}
    rng = np.random.default_rng(0)
    vocab = workers["full"][0].unwrapped.config.vocab_size
    mask = np.zeros((rows, length), dtype=np.float32)
    mask[:, length // 2:] = 1
    batch = {"input_ids": rng.integers(3, vocab, size=(rows, length)), "loss_mask": mask,
             "adv": rng.normal(size=rows).astype(np.float32)}
    times = {m: {"train": [], "sync": [], "sync_bytes": 0} for m in workers}
    for i in range(a.repeats + 1):
        for mode, (w, payload) in workers.items():
            t = time.perf_counter()
            w.train_step({**batch, "ref_logp": w.compute_logprobs(batch, "ref")}, loss_fn)
            t_train = time.perf_counter() - t
            t = time.perf_counter()
            nbytes = sum(arr.nbytes for b in w.weight_buckets(64 << 20, payload) for _, arr in b)
            if i:                                          # the first round warms up
                times[mode]["train"].append(t_train)
                times[mode]["sync"].append(time.perf_counter() - t)
            times[mode]["sync_bytes"] = nbytes
    return {m: {"train": median(v["train"]), "sync": median(v["sync"]), "sync_bytes": v["sync_bytes"]}
            for m, v in times.items()}


def run(size: str, mode: str, steps: int, ckpt: Path, root: Path, a) -> dict:
    work = root / f"{size}-{mode}"
    work.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, __file__, "--one", mode, "--ckpt", str(ckpt), "--work", str(work), "--steps", str(steps),
           "--r", str(a.r), "--lr", str(a.lr), "--lora-lr", str(a.lora_lr)]
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'benchmarks'}"}
    with open(work / "log.txt", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        with TreeRSS(proc.pid) as rss:
            code = proc.wait()
    if code != 0:
        tail = (work / "log.txt").read_text().splitlines()[-25:]
        raise SystemExit(f"{size} {mode} failed (exit {code}):\n" + "\n".join(tail))
    res = json.loads((work / "result.json").read_text())
    res["train_rss"] = rss.peak_by_role.get("TrainWorker", 0)
    return res


def row(size: str, mode: str, r: dict, t: dict) -> list:
    steps = r["steps"]
    return [size, mode, f"{(r['adapter_params'] or r['params']) / 1e6:.2f}M", t["train"], t["sync"],
            t["sync_bytes"] / 1e6, median([s["refit/bytes"] for s in steps]) / 1e6, sum(r["held"].values()) / 1e6,
            r["train_rss"] / 1e6, median([s["time/step"] for s in steps[1:]] or [steps[0]["time/step"]]),
            steps[0]["reward/total_mean"], steps[-1]["reward/total_mean"]]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", nargs="+", default=["tiny", "100m"])
    p.add_argument("--steps", nargs="+", type=int, default=[8, 3], help="steps per size (one value: all sizes)")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3, help="full fine-tuning LR")
    p.add_argument("--lora-lr", type=float, default=1e-2)
    p.add_argument("--repeats", type=int, default=3, help="interleaved trainer-side repeats per mode")
    p.add_argument("--one", choices=["full", "lora"], help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        a.mode = a.one
        a.steps = a.steps[0]
        return one_run(a)
    print(machine_line())
    steps = a.steps * len(a.sizes) if len(a.steps) == 1 else a.steps
    rows, ratios = [], []
    with tempfile.TemporaryDirectory(prefix="lora-bench-") as tmp:
        for size, n in zip(a.sizes, steps):
            ckpt = make_checkpoint(Path(tmp), size, with_tokenizer=True)
            print(f"{size}: {param_summary(ckpt)}, {n} GRPO steps (4 prompts x 4, 16 tokens, beta 0.04), "
                  f"LoRA r={a.r} on attention + routed experts", flush=True)
            t = trainer_times(ckpt, a)
            res = {mode: run(size, mode, n, ckpt, Path(tmp), a) for mode in ("full", "lora")}
            full, lora = (row(size, m, res[m], t[m]) for m in ("full", "lora"))
            rows += [full, lora]
            ratios.append([size] + [lora[i] / full[i] if full[i] else float("nan") for i in range(3, 10)])
    print(table(["size", "mode", "trains", "ref+train_s", "payload_s", "payload_MB", "refit_MB/step", "held_MB",
                 "train_rss_MB", "grpo_step_s", "reward_1", "reward_N"], rows))
    print("\nLoRA / full")
    print(table(["size", "ref+train_s", "payload_s", "payload", "refit", "held", "train_rss", "grpo_step_s"],
                ratios))


if __name__ == "__main__":
    main()
