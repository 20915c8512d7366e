"""One-step off-policy GRPO (grpo.async_rollout, split placement): the batch trained at step k was sampled one
weight version back from step 2 on (exactly, by construction), the toy reward still rises, and kill -9 +
`align grpo --resume` reproduces the uninterrupted async run's metrics (timings excluded) because the
checkpoint carries the in-flight batch."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from align.grpo.config import GRPOConfig
from tests.grpo_fixture import make_policy, write_prompts
from tests.test_resume import align, assert_same_metrics, kill_after_checkpoint_then_resume

STEPS = 6


def recipe(tmp: Path) -> Path:
    policy = make_policy(tmp)
    prompts = write_prompts(tmp / "prompts.jsonl")
    data = {"stage": "grpo", "grpo": {
        "init_from": str(policy), "data": [{"source": str(prompts)}],
        "rewards": [{"spec": "tests.grpo_fixture:brevity"}],
        "steps": STEPS, "prompts_per_step": 4, "group_size": 8, "beta": 0.04, "seed": 3,
        "is_correction": "tis", "async_rollout": {"enabled": True, "max_staleness": 1},
        "sampling": {"temperature": 1.0, "max_tokens": 16}, "save_every": 2, "keep_last": 2,
        "engine": {"cluster": {"num_cpus": 2, "placement": "split", "rollout_num_cpus": 1, "train_num_cpus": 1},
                   "rollout": {"backend": "native", "refit_checksum": True},
                   "optim": {"lr": 5e-2, "warmup_steps": 1}}}}
    path = tmp / "grpo.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_async_is_one_step_off_policy_learns_and_resumes_exactly(tmp_path):
    path = recipe(tmp_path)
    full = align("grpo", str(path), "-o", str(tmp_path / "full"))
    assert full.wait(timeout=600) == 0, full.stderr.read().decode()[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["async/staleness"] for r in rows] == [0.0] + [1.0] * (STEPS - 1)
    assert [r["async/sampled_version"] for r in rows] == [0.0, 0.0] + [float(k) for k in range(1, STEPS - 1)]
    assert all(r["async/dropped"] == 0.0 for r in rows)
    rewards = [r["reward/total_mean"] for r in rows]
    assert np.mean(rewards[-2:]) >= np.mean(rewards[:2]) + 0.1, rewards
    # from step 2 the rollout's log-probs are one version behind the trainer: the IS correction sees it
    assert rows[0]["mismatch/logp_abs_diff"] <= 1e-4 < rows[2]["mismatch/logp_abs_diff"]

    kill_after_checkpoint_then_resume(path, tmp_path / "killed", step=2)
    assert (tmp_path / "killed" / "checkpoints" / "step-4" / "inflight.pkl").exists()
    assert_same_metrics(tmp_path / "full", tmp_path / "killed", STEPS)


def test_async_needs_split_placement(tmp_path):
    with pytest.raises(ValueError, match="async_rollout needs grpo.engine.cluster.placement=split"):
        GRPOConfig(init_from="x", data=[], rewards=[{"spec": "tests.grpo_fixture:brevity"}],
                   async_rollout={"enabled": True})
