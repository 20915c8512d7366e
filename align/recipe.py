"""Recipes: YAML files that map one to one onto pydantic models, with dotted-path overrides.

    stage: grpo            # sft | rm | grpo | eval | pipeline
    grpo: {...}            # the stage's config (align.grpo.config.GRPOConfig etc.)

Every problem becomes one `RecipeError` line naming the file, the field path and what is wrong.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from align.compare import CompareConfig
from align.errors import UserError
from align.eval.run import EvalConfig
from align.grpo.config import GRPOConfig
from align.rm import RMConfig
from align.sft import SFTConfig


class RecipeError(UserError):
    pass


class SFTRecipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    stage: Literal["sft"]
    sft: SFTConfig


class RMRecipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    stage: Literal["rm"]
    rm: RMConfig


class GRPORecipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    stage: Literal["grpo"]
    grpo: GRPOConfig


class EvalRecipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    stage: Literal["eval"]
    eval: EvalConfig


class CompareRecipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    stage: Literal["compare"]
    compare: CompareConfig


class PipelineStage(BaseModel):
    """One stage of a pipeline: a recipe file plus overrides; `${name}` is that earlier stage's output dir."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., pattern=r"^[A-Za-z0-9_\-]+$")
    recipe: str = Field(..., description="path of the stage's recipe, relative to the pipeline file")
    set: dict[str, Any] = Field(default_factory=dict, description="dotted-path overrides")
    force: bool = Field(False, description="re-run even if its output is complete")


class PipelineRecipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    stage: Literal["pipeline"]
    output_dir: str = "runs/pipeline"
    stages: list[PipelineStage]
    report: bool = True


Recipe = Annotated[Union[SFTRecipe, RMRecipe, GRPORecipe, EvalRecipe, CompareRecipe, PipelineRecipe], Field(discriminator="stage")]


class _RecipeAdapter(BaseModel):
    recipe: Recipe


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b.0.c=value` -> ("a.b.0.c", value parsed as YAML)."""
    if "=" not in text:
        raise RecipeError(f"override {text!r}: expected key.path=value")
    key, value = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError:
        return key.strip(), value


def set_path(data: dict, dotted: str, value: Any, where: str) -> None:
    node: Any = data
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise RecipeError(f"{where}: {dotted}: no list item {part!r} at {'.'.join(parts[:i]) or 'top'}")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise RecipeError(f"{where}: {dotted}: {'.'.join(parts[:i])} is not a mapping")


def substitute(value: Any, outputs: dict[str, str]) -> Any:
    """Replace `${stage}` with that stage's output directory, recursively."""
    if isinstance(value, str):
        def repl(m):
            if m.group(1) not in outputs:
                raise RecipeError(f"${{{m.group(1)}}}: no earlier stage of that name")
            return outputs[m.group(1)]
        return re.sub(r"\$\{([A-Za-z0-9_\-]+)\}", repl, value)
    if isinstance(value, list):
        return [substitute(v, outputs) for v in value]
    if isinstance(value, dict):
        return {k: substitute(v, outputs) for k, v in value.items()}
    return value


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: no such recipe file")
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: not UTF-8 text (invalid byte at offset {e.start}); a recipe is a YAML file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark is not None else ""
        raise RecipeError(f"{path}: {line}bad YAML ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping with a 'stage' key")
    return data


def _format(e: ValidationError, path: str | Path) -> str:
    err = e.errors()[0]
    loc = [str(p) for p in err["loc"]][1:]       # drop the adapter's "recipe"
    if loc and loc[0] in ("sft", "rm", "grpo", "eval", "compare", "pipeline") and len(loc) > 1 and loc[1] == loc[0]:
        loc = loc[1:]                            # the union tag pydantic adds
    field = ".".join(loc) or "(top level)"
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif err["type"] in ("union_tag_invalid", "union_tag_not_found"):
        tag = err["input"].get("stage") if isinstance(err["input"], dict) else err["input"]
        field = "stage"
        msg = (f"unknown stage {tag!r}" if tag is not None else "missing") + \
            " (expected sft, rm, grpo, eval, compare or pipeline)"
    more = f" (+{len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
    return f"{path}: {field}: {msg}{more}"


def validate(data: dict, path: str | Path) -> BaseModel:
    try:
        recipe = _RecipeAdapter(recipe=data).recipe
    except ValidationError as e:
        raise RecipeError(_format(e, path)) from None
    if isinstance(recipe, GRPORecipe):
        from rewards.errors import RewardSpecError
        from rewards.registry import resolve
        for i, comp in enumerate(recipe.grpo.rewards):
            try:
                resolve(comp.spec)
            except RewardSpecError as e:
                raise RecipeError(f"{path}: grpo.rewards.{i}.spec: {e}") from None
        if recipe.grpo.held_out is not None:
            try:
                resolve(recipe.grpo.held_out.reward)
            except RewardSpecError as e:
                raise RecipeError(f"{path}: grpo.held_out.reward: {e}") from None
    return recipe


def recipe_hash(recipe: BaseModel, upstream: list[str] = (), exclude: tuple[str, ...] = ()) -> str:
    """sha256 of a resolved recipe (after overrides and `${stage}` substitution), output_dir and the stage
    block's `exclude` fields (dotted paths reach into nested blocks) left out, chained with the hashes of the stages it reads from (so a re-run
    upstream changes it)."""
    data = recipe.model_dump(mode="json")
    block = data.get(data.get("stage"), {})
    if isinstance(block, dict):
        for key in ("output_dir", *exclude):       # dotted = nested: "engine.train.world_size"
            *parents, leaf = key.split(".")
            node = block
            for part in parents:
                node = node.get(part) if isinstance(node, dict) else None
            if isinstance(node, dict):
                node.pop(leaf, None)
    text = json.dumps({"recipe": data, "upstream": list(upstream)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_recipe(path: str | Path, overrides: list[str] | dict[str, Any] = ()) -> BaseModel:
    data = read_yaml(path)
    items = overrides.items() if isinstance(overrides, dict) else map(parse_override, overrides)
    for key, value in items:
        set_path(data, key, value, str(path))
    return validate(data, path)
