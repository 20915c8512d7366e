"""Output dirs belong to one run, and a pipeline re-runs exactly the stages whose resolved recipe changed.

The stage trainers are replaced by fakes that write a checkpoint and record how they were called, so
the real decision code (align.run_dir, align.pipeline) runs in a few seconds.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import align.rm
import align.sft
from align.errors import UserError
from align.pipeline import run_pipeline
from align.recipe import load_recipe
from align.run_dir import claim_output_dir
from tests.conftest import REPO


def test_checkpoints_of_another_run_need_resume_or_force(tmp_path):
    out = tmp_path / "run"
    claim_output_dir(out, "grpo", "aaaa", resume=False, force=False)      # a fresh dir: fine
    (out / "checkpoints" / "step-4").mkdir(parents=True)
    with pytest.raises(UserError, match="step-4.*--resume.*--force"):
        claim_output_dir(out, "grpo", "aaaa", resume=False, force=False)
    claim_output_dir(out, "grpo", "aaaa", resume=True, force=False)       # the same run continues
    with pytest.raises(UserError, match="belong to grpo run aaaa, not this grpo recipe"):
        claim_output_dir(out, "grpo", "bbbb", resume=True, force=False)   # never another run's step
    claim_output_dir(out, "grpo", "bbbb", resume=False, force=True)
    assert not (out / "checkpoints").exists()                             # cleared, then owned by bbbb
    assert json.loads((out / "RUN.json").read_text()) == {"stage": "grpo", "run_id": "bbbb"}


def test_a_dir_with_checkpoints_and_no_owner_is_refused_on_resume(tmp_path):
    (tmp_path / "trainer" / "checkpoint-10").mkdir(parents=True)
    with pytest.raises(UserError, match="no RUN.json"):
        claim_output_dir(tmp_path, "sft", "cccc", resume=True, force=False)


def test_cli_grpo_refuses_another_runs_dir(tmp_path):
    from typer.testing import CliRunner

    from align.cli import app

    out = tmp_path / "run"
    (out / "checkpoints" / "step-2").mkdir(parents=True)
    (out / "RUN.json").write_text(json.dumps({"stage": "grpo", "run_id": "someone-else"}))
    for flags, needle in (([], "--resume to continue it"), (["--resume"], "belong to grpo run someone-else")):
        result = CliRunner().invoke(app, ["grpo", str(REPO / "recipes" / "grpo_reasoning.yaml"), "-o", str(out),
                                          *flags])
        assert result.exit_code == 2 and needle in result.stderr, result.output
    assert (out / "checkpoints" / "step-2").is_dir()                      # nothing was pruned


@pytest.fixture
def fake_trainers(monkeypatch):
    """run_sft / run_rm that record (stage, resume, checkpoints seen) and write a checkpoint + model."""
    calls: list[tuple[str, bool, list[str]]] = []

    def fake(stage):
        def run(cfg, resume=False):
            out = Path(cfg.output_dir)
            seen = sorted(p.name for p in (out / "trainer").glob("checkpoint-*"))
            calls.append((stage, resume, seen))
            (out / "trainer" / "checkpoint-1").mkdir(parents=True, exist_ok=True)
            (out / "model").mkdir(exist_ok=True)
            (out / "model" / "config.json").write_text("{}")
            return {"output_path": str(out / "model")}
        return run

    monkeypatch.setattr(align.sft, "run_sft", fake("sft"))
    monkeypatch.setattr(align.rm, "run_rm", fake("rm"))
    return calls


def two_stage_pipeline(tmp_path: Path, sft_lr: float, rm_lr: float) -> tuple:
    pipe = {"stage": "pipeline", "output_dir": str(tmp_path / "out"), "report": False, "stages": [
        {"name": "sft", "recipe": str(REPO / "recipes" / "sft.yaml"), "set": {"sft.lr": sft_lr}},
        {"name": "rm", "recipe": str(REPO / "recipes" / "rm_helpful.yaml"),
         "set": {"rm.model": "${sft}", "rm.lr": rm_lr}}]}
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump(pipe))
    return load_recipe(path), path


def test_pipeline_reruns_changed_stages_and_their_dependents(tmp_path, fake_trainers, capsys):
    recipe, path = two_stage_pipeline(tmp_path, 1e-3, 5e-4)
    run_pipeline(recipe, path)
    assert [c[:2] for c in fake_trainers] == [("sft", False), ("rm", False)]

    fake_trainers.clear()
    run_pipeline(recipe, path)                                    # nothing changed: both skipped, and said why
    assert fake_trainers == []
    assert capsys.readouterr().err.count("complete, skipped (recipe unchanged)") == 2

    fake_trainers.clear()
    recipe, path = two_stage_pipeline(tmp_path, 2e-3, 5e-4)     # upstream change: sft and rm both re-run
    run_pipeline(recipe, path)
    assert [c[:2] for c in fake_trainers] == [("sft", False), ("rm", False)]
    assert all(seen == [] for _, _, seen in fake_trainers)       # old checkpoints cleared, not resumed
    assert "recipe changed since its last run" in capsys.readouterr().err

    fake_trainers.clear()
    recipe, path = two_stage_pipeline(tmp_path, 2e-3, 1e-4)     # downstream change only: rm re-runs
    run_pipeline(recipe, path)
    assert [c[0] for c in fake_trainers] == ["rm"]


def test_pipeline_resumes_an_interrupted_stage_with_the_same_recipe(tmp_path, fake_trainers, capsys):
    recipe, path = two_stage_pipeline(tmp_path, 1e-3, 5e-4)
    run_pipeline(recipe, path)
    (tmp_path / "out" / "rm" / "COMPLETE.json").unlink()        # as if killed after its first checkpoint
    fake_trainers.clear()
    run_pipeline(recipe, path)
    assert fake_trainers == [("rm", True, ["checkpoint-1"])]
    assert "interrupted earlier with the same recipe: resuming" in capsys.readouterr().err


def test_wandb_run_id_is_the_same_in_every_process(tmp_path):
    """Python salts str hashes per process; the id must not depend on that (a resume logs into the same run)."""
    import os
    import subprocess
    import sys

    code = f"from align.grpo.metrics import wandb_run_id; print(wandb_run_id({str(tmp_path)!r}))"
    ids = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": seed}).stdout.strip()
           for seed in ("1", "2")}
    assert len(ids) == 1 and ids.pop().startswith("deepalign-")
