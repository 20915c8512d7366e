"""`align`: run recipes. Bad input exits 2 with one line naming the file, field and problem."""
from __future__ import annotations

import sys
from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="deepalign: SFT, reward models, GRPO and evaluation for DeepSeek-V2-style models.")

OVERRIDES = typer.Argument(None, help="key.path=value overrides, e.g. grpo.steps=20")
OUTPUT = typer.Option(None, "--output-dir", "-o", help="where outputs go (default: the recipe's or runs/<stage>)")
RESUME = typer.Option(False, "--resume", help="continue this run from its last complete checkpoint")
FORCE = typer.Option(False, "--force", help="clear the output dir (another run's checkpoints) or re-run "
                                            "complete pipeline stages")


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _run(recipe_file: Path, overrides: list[str] | None, output_dir: Path | None, resume: bool, force: bool,
         expect: str | None = None) -> None:
    from align.errors import UserError
    from engine.errors import EngineError
    from rewards.errors import RewardError
    try:
        from align.pipeline import run_pipeline, run_stage
        from align.recipe import PipelineRecipe, load_recipe
        recipe = load_recipe(recipe_file, overrides or [])
        if expect and recipe.stage != expect:
            _fail(f"{recipe_file}: stage: this is a {recipe.stage!r} recipe, not {expect!r} (use `align run`)")
        if isinstance(recipe, PipelineRecipe):
            result = run_pipeline(recipe, Path(recipe_file), output_dir, resume=True, force=force)
            from align.report import print_final_table
            print_final_table(result)
        else:
            out = output_dir or Path("runs") / Path(recipe_file).stem
            summary = run_stage(recipe, Path(out), resume=resume, force=force)
            typer.echo(f"done: {recipe.stage} -> {out} ({summary.get('seconds', '?')} s)")
    except (UserError, RewardError, EngineError) as e:
        _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130)


@app.command()
def run(recipe: Path, overrides: list[str] = OVERRIDES, output_dir: Path = OUTPUT, resume: bool = RESUME,
        force: bool = FORCE):
    """Run any recipe: a single stage or a pipeline."""
    _run(recipe, overrides, output_dir, resume, force)


@app.command()
def sft(recipe: Path, overrides: list[str] = OVERRIDES, output_dir: Path = OUTPUT, resume: bool = RESUME,
        force: bool = FORCE):
    """Supervised fine-tuning (TRL SFTTrainer)."""
    _run(recipe, overrides, output_dir, resume, force, expect="sft")


@app.command()
def rm(recipe: Path, overrides: list[str] = OVERRIDES, output_dir: Path = OUTPUT, resume: bool = RESUME,
        force: bool = FORCE):
    """Reward model training (TRL RewardTrainer)."""
    _run(recipe, overrides, output_dir, resume, force, expect="rm")


@app.command()
def grpo(recipe: Path, overrides: list[str] = OVERRIDES, output_dir: Path = OUTPUT, resume: bool = RESUME,
         force: bool = FORCE):
    """GRPO on the hybrid engine."""
    _run(recipe, overrides, output_dir, resume, force, expect="grpo")


@app.command("eval")
def eval_(recipe: Path, overrides: list[str] = OVERRIDES, output_dir: Path = OUTPUT):
    """MT-Bench and AlpacaEval on a checkpoint."""
    _run(recipe, overrides, output_dir, False, False, expect="eval")


@app.command()
def validate(recipe: Path, overrides: list[str] = OVERRIDES):
    """Check a recipe (and, for a pipeline, every stage's recipe) without running anything."""
    from align.errors import UserError
    from rewards.errors import RewardError
    try:
        from align.recipe import PipelineRecipe, load_recipe
        r = load_recipe(recipe, overrides or [])
        if isinstance(r, PipelineRecipe):
            for st in r.stages:
                load_recipe((recipe.parent / st.recipe).resolve(),
                            {k: v for k, v in st.set.items() if "${" not in str(v)})
    except (UserError, RewardError) as e:
        _fail(str(e).splitlines()[0])
    typer.echo(f"ok: {recipe} ({r.stage})")


@app.command()
def plan(recipe: Path, overrides: list[str] = OVERRIDES,
         gpus: int = typer.Option(None, "--gpus", help="training GPUs (default: the recipe's train.world_size)"),
         gpu_memory: float = typer.Option(80.0, "--gpu-memory", help="GiB per GPU"),
         prompt_tokens: int = typer.Option(512, "--prompt-tokens", help="prompt length assumed for activations")):
    """Memory per GPU and per phase of a GRPO recipe, and whether it fits (nothing is allocated)."""
    from align.errors import UserError
    from rewards.errors import RewardError
    try:
        from align.plan import format_plan, make_plan
        from align.recipe import load_recipe
        r = load_recipe(recipe, overrides or [])
        if r.stage != "grpo":
            _fail(f"{recipe}: stage: `align plan` plans grpo recipes, this is a {r.stage!r} recipe")
        typer.echo(format_plan(make_plan(r.grpo, gpus, gpu_memory, prompt_tokens)))
    except (UserError, RewardError, ValueError) as e:
        _fail(f"{recipe}: {str(e).splitlines()[0]}")


def main() -> None:  # pragma: no cover - console entry
    sys.exit(app())


if __name__ == "__main__":
    main()
