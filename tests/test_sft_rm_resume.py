"""kill -9 in the middle of SFT / reward-model training, then `--resume`: the final weights equal an
uninterrupted run's (TRL's checkpoints carry model, optimizer, scheduler, RNG and the data position)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import REPO

STEPS, SAVE = 16, 4


def recipe(tmp: Path, stage: str) -> Path:
    common = {"max_steps": STEPS, "save_steps": SAVE, "keep_last": 2, "batch_size": 8, "lr": 1e-3,
              "logging_steps": 1, "seed": 0, "max_len": 96}
    if stage == "sft":
        body = {"model": "tiny", "train_data": [{"source": "bundled:reasoning_sft?levels=1&n=400"}], **common}
    else:
        from tests.grpo_fixture import make_policy
        body = {"model": str(make_policy(tmp)), "train_data": [{"source": "bundled:helpful_pairs?n=400"}], **common}
    path = tmp / f"{stage}.yaml"
    path.write_text(yaml.safe_dump({"stage": stage, stage: body}))
    return path


def align(*args: str, wait: bool = True):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "align.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    if wait:
        assert proc.wait(timeout=900) == 0, proc.stderr.read().decode()[-2000:]
    return proc


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "model.safetensors"))


@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_kill_and_resume_matches_uninterrupted(tmp_path, stage):
    path = recipe(tmp_path, stage)
    align(stage, str(path), "-o", str(tmp_path / "full"))

    run = tmp_path / "killed"
    victim = align(stage, str(path), "-o", str(run), wait=False)
    marker = run / "trainer" / f"checkpoint-{SAVE}" / "trainer_state.json"
    deadline = time.time() + 600
    while not marker.exists():                                  # mid-run, past its first checkpoint
        assert victim.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.05)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    assert not (run / "model").exists()

    from typer.testing import CliRunner

    from align.cli import app
    refused = CliRunner().invoke(app, [stage, str(path), "-o", str(run)])   # no flag: refuses, prunes nothing
    assert refused.exit_code == 2 and "--resume" in refused.stderr, refused.output
    assert (run / "trainer" / f"checkpoint-{SAVE}").is_dir()
    align(stage, str(path), "-o", str(run), "--resume")

    want, got = weights(tmp_path / "full"), weights(run)
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=k)
