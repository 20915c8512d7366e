"""kill -9 in the middle of GRPO, then `align grpo --resume`: the per-step metrics equal an uninterrupted run's."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from engine.cluster import ray_temp_dir
from engine.config import ClusterConfig
from tests.grpo_fixture import make_policy, write_prompts

REPO = Path(__file__).resolve().parents[1]
STEPS = 8


def recipe(tmp: Path) -> Path:
    policy = make_policy(tmp)
    prompts = write_prompts(tmp / "prompts.jsonl")
    data = {"stage": "grpo", "grpo": {
        "init_from": str(policy), "data": [{"source": str(prompts)}],
        "rewards": [{"spec": "tests.grpo_fixture:brevity"}],
        "steps": STEPS, "prompts_per_step": 4, "group_size": 4, "beta": 0.04, "seed": 3,
        "sampling": {"temperature": 1.0, "max_tokens": 10}, "save_every": 2, "keep_last": 2,
        "engine": {"cluster": {"num_cpus": 2, "rollout_num_cpus": 1, "train_num_cpus": 1},
                   "rollout": {"backend": "native"}, "optim": {"lr": 1e-2, "warmup_steps": 3}}}}
    path = tmp / "grpo.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def align(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "align.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def comparable(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "refit/"))} for r in rows]


def kill_after_checkpoint_then_resume(path: Path, run: Path, step: int) -> None:
    """`align grpo` into run, kill -9 (with its own Ray processes) once checkpoint `step` is complete, then
    `align grpo --resume` to the end."""
    victim = align("grpo", str(path), "-o", str(run))
    deadline = time.time() + 600
    while not (run / "checkpoints" / f"step-{step}" / "trainer_state.json").exists():  # mid-run, past a checkpoint
        assert victim.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.2)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    temp = ray_temp_dir(ClusterConfig(), run)          # the killed run's own Ray processes, and no others
    subprocess.run(["pkill", "-9", "-f", temp], capture_output=True)
    resumed = align("grpo", str(path), "-o", str(run), "--resume")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read().decode()[-2000:]


def assert_same_metrics(full: Path, run: Path, steps: int) -> None:
    """Every step's metrics (timings excluded) of run equal the uninterrupted run's to 1e-6 (relative)."""
    want, got = comparable(full), comparable(run)
    assert [r["step"] for r in got] == list(range(1, steps + 1))
    for a, b in zip(want, got):
        assert a.keys() == b.keys()
        for k in a:
            assert abs(a[k] - b[k]) <= 1e-6 * max(1.0, abs(a[k])), (a["step"], k, a[k], b[k])


def test_kill_and_resume_matches_uninterrupted(tmp_path):
    path = recipe(tmp_path)
    full = align("grpo", str(path), "-o", str(tmp_path / "full"))
    assert full.wait(timeout=600) == 0, full.stderr.read().decode()[-2000:]
    kill_after_checkpoint_then_resume(path, tmp_path / "killed", step=4)
    assert_same_metrics(tmp_path / "full", tmp_path / "killed", STEPS)
