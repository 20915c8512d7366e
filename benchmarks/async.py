"""Synchronous vs one-step off-policy (async) GRPO on this machine, split placement, 1 CPU per side.

Same checkpoint, prompts, rewards, seeds, group size and lengths; for each size one sync run and one async
run (grpo.async_rollout.enabled), side by side: seconds per step, generated tokens/s, and the idle share
of each side (trainer: 1 - (train + refit) / step; rollout: 1 - generation / step), medians over the steps
after the first (start-up and the async run's first, unoverlapped step left out).

    .venv/bin/python benchmarks/async.py [--sizes tiny 100m] [--steps 6] [--max-tokens 32]
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import machine_line, make_checkpoint, median, param_summary, table  # noqa: E402


def run(policy: Path, prompts: Path, out: Path, steps: int, max_tokens: int, enabled: bool) -> list[dict]:
    from align.data.loading import DataSource
    from align.grpo.config import GRPOConfig
    from align.grpo.loop import run_grpo
    from engine.config import ClusterConfig, EngineConfig, OptimConfig, RolloutConfig
    from engine.sampling import SamplingConfig
    from rewards.combine import RewardComponent

    cfg = GRPOConfig(
        init_from=str(policy), data=[DataSource(source=str(prompts))],
        rewards=[RewardComponent(spec="benchmarks.async:length_reward")], steps=steps, prompts_per_step=4,
        group_size=8, beta=0.0, seed=0, sampling=SamplingConfig(temperature=1.0, max_tokens=max_tokens),
        async_rollout={"enabled": enabled, "max_staleness": 1},
        engine=EngineConfig(cluster=ClusterConfig(num_cpus=2, placement="split", rollout_num_cpus=1, train_num_cpus=1,
                                                  actor_threads=1),
                            rollout=RolloutConfig(backend="native"), optim=OptimConfig(lr=1e-4)))
    run_grpo(cfg, out)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def length_reward(prompts: list[str], completions: list[str], **columns) -> list[float]:
    """Any reward that varies: the completion's length (keeps completions near the cap, equal work per step)."""
    return [len(c) / 100 for c in completions]


def summary(rows: list[dict]) -> dict[str, float]:
    rest = rows[1:] or rows
    return {"step_s": median([r["time/step"] for r in rest]),
            "tokens_per_s": median([r["tokens/generated"] / r["time/step"] for r in rest]),
            "train_idle": median([r["time/train_idle_share"] for r in rest]),
            "rollout_idle": median([r["time/rollout_idle_share"] for r in rest]),
            "staleness": max(r.get("async/staleness", 0.0) for r in rows)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", nargs="+", default=["tiny", "100m"])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    print(machine_line())
    print(f"split placement, 1 CPU rollout + 1 CPU trainer; 4 prompts x G=8, {args.max_tokens} new tokens, "
          f"{args.steps} steps, medians over steps 2..{args.steps}")
    root = Path(tempfile.mkdtemp(prefix="bench-async-"))
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Count to {i % 7 + 2}:"}) + "\n" for i in range(32)))
    for size in args.sizes:
        policy = make_checkpoint(root, size, with_tokenizer=True)
        sync = summary(run(policy, prompts, root / f"{size}-sync", args.steps, args.max_tokens, False))
        asyn = summary(run(policy, prompts, root / f"{size}-async", args.steps, args.max_tokens, True))
        print(f"\n{size}: {param_summary(policy)}")
        rows = [[k, sync[k], asyn[k], asyn[k] / sync[k] if sync[k] else float("nan")]
                for k in ("step_s", "tokens_per_s", "train_idle", "rollout_idle")]
        rows.append(["max staleness", sync["staleness"], asyn["staleness"], ""])
        print(table(["", "sync", "async", "async/sync"], rows))


if __name__ == "__main__":
    main()
