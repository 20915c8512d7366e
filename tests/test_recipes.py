"""Recipe validation: every malformed recipe gives exit code 2 and one line naming file, field and problem."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from align.cli import app

REPO = Path(__file__).resolve().parents[1]
GOOD_GRPO = (REPO / "recipes" / "grpo_reasoning.yaml").read_text()
STEPS_LINE = re.search(r"^  steps: \d+$", GOOD_GRPO, re.M).group(0)

CASES = [  # (name, recipe text or None for a missing file, extra CLI args, expected message fragment)
    ("bad yaml", "stage: grpo\ngrpo: {init_from: x\n  steps: 3", [], "line 3: bad YAML"),
    ("unknown stage", "stage: train\n", [], "stage: unknown stage 'train'"),
    ("unknown key", GOOD_GRPO.replace(STEPS_LINE, "  stepz: 30"), [], "grpo.stepz: unknown key"),
    ("wrong type", GOOD_GRPO.replace(STEPS_LINE, "  steps: many"), [], "grpo.steps: Input should be a valid integer"),
    ("nested wrong type", GOOD_GRPO.replace("max_tokens: 48}", "max_tokens: -3}"), [],
     "grpo.sampling.max_tokens: Input should be greater than or equal to 1"),
    ("missing field", "stage: grpo\ngrpo: {data: [], rewards: []}\n", [], "grpo.init_from: Field required"),
    ("unknown reward name", GOOD_GRPO.replace("spec: reasoning,", "spec: no_such_reward,"), [],
     "grpo.rewards.0.spec:"),
    ("bad dotted path", GOOD_GRPO.replace("spec: reasoning,", "spec: 'nonexistent_pkg.mod:fn',"), [],
     "grpo.rewards.0.spec:"),
    ("bad override path", GOOD_GRPO, ["grpo.rewards.5.weight=2"], "grpo.rewards.5.weight: no list item '5'"),
    ("override wrong type", GOOD_GRPO, ["grpo.group_size=one"], "grpo.group_size: Input should be a valid integer"),
    ("missing file", None, [], "no such recipe file"),
    ("reward scoped to no data source", GOOD_GRPO, ["grpo.rewards.0.where={data_source: [reasonin]}"],
     "where.data_source names ['reasonin'], not a data source"),
]


@pytest.mark.parametrize("name,text,args,expected", CASES, ids=[c[0] for c in CASES])
def test_malformed_recipe_one_line_exit_2(tmp_path, name, text, args, expected):
    path = tmp_path / "recipe.yaml"
    if text is not None:
        path.write_text(text)
    result = CliRunner().invoke(app, ["validate", str(path), *args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    assert str(path) in lines[0] and expected in lines[0], lines[0]


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "recipes").glob("*.yaml")))
def test_bundled_recipes_validate(recipe):
    result = CliRunner().invoke(app, ["validate", str(REPO / "recipes" / recipe)])
    assert result.exit_code == 0, result.output


def test_console_script_exit_code(tmp_path):
    """The installed `align` entry point itself exits 2 (not 1) on bad input."""
    bad = tmp_path / "r.yaml"
    bad.write_text("stage: sft\nsft: {model: tiny, train_data: [], bogus: 1}\n")
    proc = subprocess.run([sys.executable, "-m", "align.cli", "validate", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2 and "sft.bogus: unknown key" in proc.stderr
