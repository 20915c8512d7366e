"""Runs one recipe, or a pipeline of them where each stage's output feeds the next.

A stage's output directory is complete once `COMPLETE.json` is written in it (atomically,
last). Each stage's resolved recipe (after overrides and `${stage}` substitution, chained with
the hashes of the stages it reads from) is hashed; on a re-run a complete stage with the same
hash is skipped, one whose hash changed is re-run from scratch (its old checkpoints cleared, not
resumed), and an interrupted one resumes when its hash is unchanged. Each decision is printed
with its reason.
"""
from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

from rich.console import Console

from align.eval.io import write_json
from align.recipe import (CompareRecipe, EvalRecipe, GRPORecipe, PipelineRecipe, RMRecipe, SFTRecipe,
                          load_recipe, recipe_hash, substitute)
from align.run_dir import CONTINUATION_FIELDS, claim_output_dir

COMPLETE = "COMPLETE.json"
PIPELINE_FILE = "PIPELINE.json"  # the stage's recipe hash, written when a pipeline starts it
console = Console(stderr=True)


def is_complete(output_dir: Path) -> bool:
    return (output_dir / COMPLETE).is_file()


def mark_complete(output_dir: Path, summary: dict) -> None:
    write_json(output_dir / COMPLETE, json.loads(json.dumps(summary, default=str)))


def run_stage(recipe, output_dir: Path, resume: bool = False, force: bool = False,
              pipeline_hash: str | None = None) -> dict:
    """Run a single-stage recipe into output_dir; returns its summary (metrics and output paths).

    Training stages first claim output_dir (align.run_dir): another run's checkpoints there are an
    error unless resume (same run only) or force (cleared first). A pipeline passes the stage's
    recipe hash, recorded in PIPELINE.json at the start and in COMPLETE.json at the end.
    """
    if isinstance(recipe, (SFTRecipe, RMRecipe, GRPORecipe)):
        claim_output_dir(output_dir, recipe.stage, recipe_hash(recipe, exclude=CONTINUATION_FIELDS), resume, force)
    elif force and output_dir.exists():
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / COMPLETE).unlink(missing_ok=True)   # a re-run is incomplete until it finishes
    if pipeline_hash is not None:
        write_json(output_dir / PIPELINE_FILE, {"recipe_hash": pipeline_hash})
    t0 = time.time()
    if isinstance(recipe, SFTRecipe):
        from align.sft import run_sft
        result = run_sft(recipe.sft.model_copy(update={"output_dir": str(output_dir)}), resume=resume)
    elif isinstance(recipe, RMRecipe):
        from align.rm import run_rm
        result = run_rm(recipe.rm.model_copy(update={"output_dir": str(output_dir)}), resume=resume)
    elif isinstance(recipe, GRPORecipe):
        from align.grpo.loop import run_grpo
        result = run_grpo(recipe.grpo, output_dir, resume=resume)
    elif isinstance(recipe, EvalRecipe):
        from align.eval.run import run_eval
        result = run_eval(recipe.eval.model_copy(update={"output_dir": output_dir}))
    elif isinstance(recipe, CompareRecipe):
        from align.compare import run_compare
        result = run_compare(recipe.compare.model_copy(update={"output_dir": str(output_dir)}))
    else:
        raise TypeError(f"not a single-stage recipe: {type(recipe).__name__}")
    summary = {"stage": recipe.stage, "seconds": round(time.time() - t0, 1), **(result or {})}
    if pipeline_hash is not None:
        summary["recipe_hash"] = pipeline_hash
    mark_complete(output_dir, summary)
    return summary


def referenced_stages(value) -> set[str]:
    """Names of the earlier stages a stage's `set:` overrides read from (`${name}`)."""
    if isinstance(value, str):
        return set(re.findall(r"\$\{([A-Za-z0-9_\-]+)\}", value))
    if isinstance(value, dict):
        return set().union(*map(referenced_stages, value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*map(referenced_stages, value)) if value else set()
    return set()


def plan_stage(stage_dir: Path, digest: str, force: bool) -> tuple[str, str]:
    """What a pipeline does with a stage: ("skip" | "resume" | "fresh", why), from its last run's record."""
    if force:
        return "fresh", "forced: re-running from scratch"
    if is_complete(stage_dir):
        last = json.loads((stage_dir / COMPLETE).read_text()).get("recipe_hash")
        if last == digest:
            return "skip", "recipe unchanged"
        return "fresh", (f"recipe changed since its last run (hash {last} -> {digest}, here or upstream): "
                         "re-running from scratch")
    started = stage_dir / PIPELINE_FILE
    if started.is_file():
        last = json.loads(started.read_text()).get("recipe_hash")
        if last == digest:
            return "resume", "interrupted earlier with the same recipe: resuming"
        return "fresh", f"interrupted earlier with another recipe (hash {last} -> {digest}): starting over"
    if stage_dir.exists() and any(stage_dir.iterdir()):
        return "fresh", "output holds an unknown earlier run: starting over"
    return "fresh", "not run yet"


def stage_output(output_dir: Path, summary_or_dir) -> str:
    """Where the next stage finds this stage's model: <stage>/model when the stage saved one there."""
    d = Path(summary_or_dir)
    return str(d / "model") if (d / "model" / "config.json").exists() else str(d)


def run_pipeline(recipe: PipelineRecipe, pipeline_file: Path, output_dir: Path | None = None,
                 resume: bool = True, force: bool = False) -> dict:
    root = Path(output_dir or recipe.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    outputs: dict[str, str] = {}
    summaries: dict[str, dict] = {}
    hashes: dict[str, str] = {}
    n = len(recipe.stages)
    for i, st in enumerate(recipe.stages, 1):
        stage_dir = root / st.name
        recipe_path = (pipeline_file.parent / st.recipe).resolve()
        overrides = {k: substitute(v, outputs) for k, v in st.set.items()}
        stage_recipe = load_recipe(recipe_path, overrides)
        upstream = [hashes[name] for name in sorted(referenced_stages(st.set)) if name in hashes]
        digest = hashes[st.name] = recipe_hash(stage_recipe, upstream)
        action, why = plan_stage(stage_dir, digest, force or st.force)
        if action == "skip":
            console.print(f"[{i}/{n}] {st.name}: complete, skipped ({why})")
            summaries[st.name] = json.loads((stage_dir / COMPLETE).read_text())
        else:
            console.rule(f"[{i}/{n}] {st.name} ({stage_recipe.stage})")
            console.print(f"{st.name}: {why}")
            summaries[st.name] = run_stage(stage_recipe, stage_dir, resume=resume and action == "resume",
                                           force=action == "fresh", pipeline_hash=digest)
        outputs[st.name] = stage_output(root, stage_dir)
    result = {"stages": summaries, "output_dir": str(root)}
    if recipe.report:
        from align.report import write_report
        result["report"] = str(write_report(root, summaries))
    return result
