"""Runs one recipe, or a pipeline of them where each stage's output feeds the next.

A stage's output directory is complete once `COMPLETE.json` is written in it (atomically,
last); a complete stage is skipped on re-runs unless forced, so an interrupted pipeline
resumes at the stage it was in.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from rich.console import Console

from align.recipe import (CompareRecipe, EvalRecipe, GRPORecipe, PipelineRecipe, RMRecipe, SFTRecipe,
                          load_recipe, substitute)

COMPLETE = "COMPLETE.json"
console = Console(stderr=True)


def is_complete(output_dir: Path) -> bool:
    return (output_dir / COMPLETE).is_file()


def mark_complete(output_dir: Path, summary: dict) -> None:
    tmp = output_dir / f".{COMPLETE}.tmp"
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, output_dir / COMPLETE)


def run_stage(recipe, output_dir: Path, resume: bool = False) -> dict:
    """Run a single-stage recipe into output_dir; returns its summary (metrics and output paths)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if isinstance(recipe, SFTRecipe):
        from align.sft import run_sft
        result = run_sft(recipe.sft.model_copy(update={"output_dir": str(output_dir)}))
    elif isinstance(recipe, RMRecipe):
        from align.rm import run_rm
        result = run_rm(recipe.rm.model_copy(update={"output_dir": str(output_dir)}))
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
    mark_complete(output_dir, summary)
    return summary


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
    for i, st in enumerate(recipe.stages, 1):
        stage_dir = root / st.name
        recipe_path = (pipeline_file.parent / st.recipe).resolve()
        overrides = {k: substitute(v, outputs) for k, v in st.set.items()}
        stage_recipe = load_recipe(recipe_path, overrides)
        if is_complete(stage_dir) and not (force or st.force):
            console.print(f"[{i}/{len(recipe.stages)}] {st.name}: complete, skipped")
            summaries[st.name] = json.loads((stage_dir / COMPLETE).read_text())
        else:
            console.rule(f"[{i}/{len(recipe.stages)}] {st.name} ({stage_recipe.stage})")
            summaries[st.name] = run_stage(stage_recipe, stage_dir, resume=resume)
        outputs[st.name] = stage_output(root, stage_dir)
    result = {"stages": summaries, "output_dir": str(root)}
    if recipe.report:
        from align.report import write_report
        result["report"] = str(write_report(root, summaries))
    return result
