"""kill -9 in the middle of a 2-rank fsdp2 GRPO run (sharded DCP checkpoints), then `align grpo --resume`:
the per-step metrics equal an uninterrupted run's; and the finished 2-rank run continues at 1 rank (DCP
reshards; the rank count is not part of the run's identity). Worker-level resharding checks: test_fsdp.py."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from tests.grpo_fixture import make_policy, write_prompts
from tests.test_resume import align, assert_same_metrics, kill_after_checkpoint_then_resume

STEPS = 4


def recipe(tmp: Path) -> Path:
    data = {"stage": "grpo", "grpo": {
        "init_from": str(make_policy(tmp)), "data": [{"source": str(write_prompts(tmp / "prompts.jsonl"))}],
        "rewards": [{"spec": "tests.grpo_fixture:brevity"}],
        "steps": STEPS, "prompts_per_step": 4, "group_size": 3, "beta": 0.04, "seed": 3,
        "sampling": {"temperature": 1.0, "max_tokens": 8}, "save_every": 2, "keep_last": 2,
        "engine": {"cluster": {"num_cpus": 2, "rollout_num_cpus": 1, "train_num_cpus": 1,
                               "node_ip_address": "127.0.0.2"},
                   "rollout": {"backend": "native"}, "optim": {"lr": 1e-2, "warmup_steps": 3},
                   "train": {"world_size": 2, "sharding": "fsdp2"}}}}
    path = tmp / "grpo.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_fsdp2_kill_and_resume_matches_uninterrupted(tmp_path):
    path = recipe(tmp_path)
    full = align("grpo", str(path), "-o", str(tmp_path / "full"))
    assert full.wait(timeout=600) == 0, full.stderr.read().decode()[-2000:]
    assert (tmp_path / "full" / "checkpoints" / f"step-{STEPS}" / "engine" / "dcp").is_dir()   # sharded layout

    kill_after_checkpoint_then_resume(path, tmp_path / "killed", step=2)
    assert_same_metrics(tmp_path / "full", tmp_path / "killed", STEPS)

    # the finished 2-rank run continues at 1 rank: DCP reshards, the rank count is not the run's identity
    more = align("grpo", str(path), "-o", str(tmp_path / "full"), "--resume", f"grpo.steps={STEPS + 1}",
                 "grpo.engine.train.world_size=1")
    assert more.wait(timeout=600) == 0, more.stderr.read().decode()[-2000:]
    records = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 2))      # continued, not restarted
    assert (tmp_path / "full" / "checkpoints" / f"step-{STEPS + 1}").is_dir()
