"""The quickstart pipeline, shrunk to a few steps per stage, end to end through the CLI.

The stages, their wiring (`${stage}` outputs feeding the next stage) and the closing table are the
ones `make demo` runs: only sizes are overridden, so a broken link between stages fails here.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.numpy import load_file

from align.compare import table_from_raw

from tests.conftest import REPO, SHARED_DATA

ALPACA_REF = SHARED_DATA / "alpaca_eval" / "gpt4_1106_preview_outputs.json"

# Per stage name: extra overrides that shrink it (added to the quickstart's own `set`).
SHRINK = {
    "sft": {"sft.max_steps": 6, "sft.train_data.0.source": "bundled:reasoning_sft?levels=1&n=48",
            "sft.train_data.1.source": "bundled:sft_mixture?n=48", "sft.eval_data.0.source":
            "bundled:reasoning_sft?levels=1&n=8"},
    "sft_worked": {"sft.max_steps": 3, "sft.train_data.0.source": "bundled:reasoning_sft?levels=6&n=24",
                   "sft.train_data.1.source": "bundled:reasoning_sft?levels=1&n=24"},
    "sft_final": {"sft.max_steps": 3, "sft.train_data.0.source": "bundled:reasoning_sft?levels=6&n=24&direct=67",
                  "sft.train_data.1.source": "bundled:sft_mixture?n=24"},
    "rm_helpful": {"rm.max_steps": 3, "rm.train_data.0.source": "bundled:helpful_pairs?n=32",
                   "rm.eval_data.0.source": "bundled:helpful_pairs?n=8"},
    "rm_safety": {"rm.max_steps": 3, "rm.train_data.0.source": "bundled:safety?n=32",
                  "rm.eval_data.0.source": "bundled:safety?n=8"},
    "grpo_reasoning": {"grpo.steps": 2, "grpo.prompts_per_step": 2, "grpo.group_size": 4,
                       "grpo.sampling.max_tokens": 12, "grpo.held_out.max_prompts": 4, "grpo.save_every": 1},
    "grpo_preference": {"grpo.steps": 2, "grpo.prompts_per_step": 2, "grpo.group_size": 4,
                        "grpo.sampling.max_tokens": 12, "grpo.held_out.max_prompts": 4},
    "compare": {"compare.max_tokens": 8, "compare.reasoning.source": "bundled:reasoning?levels=6&n=4",
                "compare.chat.source": "bundled:helpful_pairs?n=4", "compare.safety.source": "bundled:safety?n=4"},
    "eval": {"eval.mtbench.max_questions": 2, "eval.mtbench.max_tokens": 8, "eval.alpacaeval.max_instances": 10,
             "eval.alpacaeval.max_tokens": 8, "eval.alpacaeval.reference_outputs": str(ALPACA_REF),
             "eval.generator": "native"},
}


def shrunk_quickstart(tmp: Path) -> Path:
    pipe = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())
    for st in pipe["stages"]:
        st["recipe"] = str(REPO / "recipes" / st["recipe"])
        st["set"] = {**st.get("set", {}), **SHRINK[st["name"]]}
    path = tmp / "quickstart_small.yaml"
    path.write_text(yaml.safe_dump(pipe, sort_keys=False))
    return path


def align(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "align.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=1500)


@pytest.mark.skipif(not ALPACA_REF.exists(), reason=f"AlpacaEval reference outputs not found at {ALPACA_REF}")
def test_quickstart_pipeline_end_to_end_then_skips(tmp_path):
    recipe, out = shrunk_quickstart(tmp_path), tmp_path / "run"
    first = align("run", str(recipe), "--output-dir", str(out))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    names = [st["name"] for st in yaml.safe_load(recipe.read_text())["stages"]]
    for name in names:
        assert (out / name / "COMPLETE.json").exists(), name
    # The chaining: stage 2 started from stage 1's export and trained on, so its weights differ from it.
    s1 = load_file(str(out / "grpo_reasoning" / "model" / "model.safetensors"))
    s2 = load_file(str(out / "grpo_preference" / "model" / "model.safetensors"))
    assert s1.keys() == s2.keys() and any((s1[k] != s2[k]).any() for k in s1)
    # The closing table has every checkpoint, in the pipeline's order, with all three columns, each a
    # mean with its 95% interval over the 4 prompts, and the paired differences of consecutive checkpoints.
    summary = json.loads((out / "compare" / "COMPLETE.json").read_text())
    table, diffs = summary["table"], summary["differences"]
    assert list(table) == ["sft", "grpo_reasoning", "grpo_preference"]
    columns = {"reasoning_accuracy", "helpful_rm_score", "safety_rm_score"}
    for row in table.values():
        assert set(row) == columns
        for name, cell in row.items():
            assert set(cell) == {"mean", "lo", "hi", "n", "interval"} and cell["n"] == 4
            assert cell["lo"] <= cell["mean"] <= cell["hi"]
            assert cell["interval"] == ("wilson" if name == "reasoning_accuracy" else "bootstrap")
        assert 0.0 <= row["reasoning_accuracy"]["lo"] <= row["reasoning_accuracy"]["hi"] <= 1.0
    assert list(diffs) == ["grpo_reasoning - sft", "grpo_preference - grpo_reasoning"]
    assert all(set(d) == columns and d["helpful_rm_score"]["interval"] == "paired-bootstrap" for d in diffs.values())
    # ... and it is recomputed exactly from the saved per-prompt raw scores (each RM on its own prompts).
    raw = json.loads((out / "compare" / "per_prompt.json").read_text())
    assert table_from_raw(raw) == (table, diffs)
    assert raw["safety_rm_score"]["prompts"] != raw["helpful_rm_score"]["prompts"]
    report = (out / "report.md").read_text()
    assert "| grpo_preference |" in report and "95% wilson" in report and "final KL" in report
    assert "Sample completions" in report and (out / "training.png").stat().st_size > 0
    assert "report:" in first.stdout and "grpo_preference" in first.stdout
    eval_results = json.loads((out / "eval" / "results.json").read_text())
    assert eval_results["mt_bench"] and eval_results["alpaca_eval"]

    # A second run finds every stage complete and skips it (no stage output is rewritten).
    mtime = (out / "grpo_preference" / "model" / "model.safetensors").stat().st_mtime_ns
    again = align("run", str(recipe), "--output-dir", str(out))
    assert again.returncode == 0, again.stderr[-2000:]
    assert (again.stdout + again.stderr).count("complete, skipped") == len(names)
    assert (out / "grpo_preference" / "model" / "model.safetensors").stat().st_mtime_ns == mtime
