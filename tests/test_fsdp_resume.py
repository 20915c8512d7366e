"""kill -9 in the middle of a 2-rank fsdp2 GRPO run (sharded DCP checkpoints), then `align grpo --resume`:
the per-step metrics equal an uninterrupted run's. (Resuming a 2-rank checkpoint at 1 rank: test_fsdp.py.)"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import yaml

from engine.cluster import ray_temp_dir
from engine.config import ClusterConfig
from tests.grpo_fixture import make_policy, write_prompts
from tests.test_resume import align, comparable

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

    run = tmp_path / "killed"
    victim = align("grpo", str(path), "-o", str(run))
    deadline = time.time() + 600
    while not (run / "checkpoints" / "step-2" / "trainer_state.json").exists():
        assert victim.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.2)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    subprocess.run(["pkill", "-9", "-f", ray_temp_dir(ClusterConfig(), run)], capture_output=True)
    resumed = align("grpo", str(path), "-o", str(run), "--resume")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read().decode()[-2000:]

    want, got = comparable(tmp_path / "full"), comparable(run)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for a, b in zip(want, got):
        assert a.keys() == b.keys()
        for k in a:
            assert abs(a[k] - b[k]) <= 1e-6 * max(1.0, abs(a[k])), (a["step"], k, a[k], b[k])
