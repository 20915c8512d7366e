"""Every user error at the CLI is one line on stderr and exit 2, never a traceback."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import REPO


def align(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """`align ...` in a fresh process (what a user runs; Ray-starting commands need their own process)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "align.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def align_here(*args: str) -> subprocess.CompletedProcess:
    """`align ...` in this process (Typer's runner): the same exit code and stderr, without the import cost."""
    from typer.testing import CliRunner

    from align.cli import app

    result = CliRunner().invoke(app, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1, lines
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_non_utf8_recipe(tmp_path):
    bad = tmp_path / "random.yaml"
    bad.write_bytes(bytes(range(128, 256)) * 4)
    one_line_error(align_here("validate", str(bad)), str(bad), "not UTF-8")


def test_bad_lr_scheduler_for_sft_and_rm(tmp_path):
    sft = yaml.safe_load((REPO / "recipes" / "sft.yaml").read_text())
    sft["sft"]["lr_scheduler"] = "cosine_typo"
    one_line_error(align_here("validate", str(write(tmp_path / "sft.yaml", sft))), "sft.lr_scheduler", "cosine_typo")
    rm = yaml.safe_load((REPO / "recipes" / "rm_helpful.yaml").read_text())
    rm["rm"]["lr_scheduler"] = "warmup-ish"
    one_line_error(align_here("validate", str(write(tmp_path / "rm.yaml", rm))), "rm.lr_scheduler", "warmup-ish")


def test_held_out_reward_that_does_not_resolve(tmp_path):
    grpo = yaml.safe_load((REPO / "recipes" / "grpo_reasoning.yaml").read_text())
    grpo["grpo"]["held_out"]["reward"] = "no_such_module:nothing"
    one_line_error(align_here("validate", str(write(tmp_path / "g.yaml", grpo))), "grpo.held_out.reward")


def test_judge_path_that_is_not_a_model_dir(tmp_path):
    from tests.grpo_fixture import make_policy

    policy = make_policy(tmp_path)
    (tmp_path / "not_a_model").mkdir()
    recipe = {"stage": "eval", "eval": {"model_path": str(policy), "generator": "native",
                                        "judge": {"kind": "reward_model", "path": str(tmp_path / "not_a_model")},
                                        "output_dir": str(tmp_path / "eval")}}
    one_line_error(align_here("eval", str(write(tmp_path / "e.yaml", recipe))), "judge.path", "not a model directory")


def test_rollout_actor_that_fails_to_start(tmp_path):
    """The backend's constructor raises: the CLI prints the cause (type and message) on one line."""
    from tests.grpo_fixture import make_policy, write_prompts

    policy = make_policy(tmp_path)
    recipe = {"stage": "grpo", "grpo": {
        "init_from": str(policy), "data": [{"source": str(write_prompts(tmp_path / "p.jsonl"))}],
        "rewards": [{"spec": "tests.grpo_fixture:brevity"}], "steps": 1, "prompts_per_step": 2, "group_size": 2,
        "engine": {"cluster": {"num_cpus": 2, "rollout_num_cpus": 1, "train_num_cpus": 1,
                               "startup_timeout_s": 120},
                   "rollout": {"backend": "native", "kwargs": {"no_such_option": 1}}}}}
    one_line_error(align("grpo", str(write(tmp_path / "g.yaml", recipe)), "-o", str(tmp_path / "run")),
                   "rollout actor failed to start", "TypeError", "no_such_option")
