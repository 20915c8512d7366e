"""The pipeline's closing table: SFT vs GRPO stage 1 vs stage 2 on the same held-out prompts.

For every checkpoint: greedy held-out reasoning accuracy (math reward), mean helpful-RM and
safety-RM scores of its answers to held-out chat and safety prompts. These are the numbers that
show each stage doing its job (stage 1 raises accuracy; stage 2 raises both RM scores).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from align.data.loading import DataSource, load_rows
from engine.rollout_native import NativeRollout
from engine.sampling import SamplingConfig


class CompareConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    checkpoints: dict[str, str] = Field(..., description="label -> checkpoint dir, in table order")
    reasoning: DataSource = Field(default_factory=lambda: DataSource(source="bundled:reasoning?levels=1&n=64",
                                                                     split="test"))
    chat: DataSource = Field(default_factory=lambda: DataSource(source="bundled:helpful_pairs?n=32", split="test"))
    safety: DataSource = Field(default_factory=lambda: DataSource(source="bundled:safety?n=32", split="test"))
    helpful_rm: str | None = None
    safety_rm: str | None = None
    max_tokens: int = Field(48, ge=1)
    output_dir: str = "runs/compare"


def _answers(path: str, prompts: list[str], max_tokens: int) -> list[str]:
    rollout = NativeRollout(path, capture_routing=False)
    tok = rollout.tokenizer
    ids = [tok(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                       tokenize=False), add_special_tokens=False)["input_ids"] for p in prompts]
    outs = rollout.generate(ids, SamplingConfig(n=1, temperature=0.0, max_tokens=max_tokens, seed=0))
    return [o.text for o in sorted(outs, key=lambda o: o.prompt_index)]


def run_compare(cfg: CompareConfig) -> dict:
    from rewards.model_reward import RewardModelScorer
    from rewards.rule import math_accuracy

    reasoning = load_rows(cfg.reasoning.source, cfg.reasoning.split, cfg.reasoning.columns,
                          ("prompt", "answer"))[0].to_dict()
    chat = list(load_rows(cfg.chat.source, cfg.chat.split, cfg.chat.columns, ("prompt",))[0]["prompt"])
    safety = list(load_rows(cfg.safety.source, cfg.safety.split, cfg.safety.columns, ("prompt",))[0]["prompt"])
    scorers = {name: RewardModelScorer(p) for name, p in (("helpful_rm", cfg.helpful_rm), ("safety_rm", cfg.safety_rm))
               if p}
    table: dict[str, dict[str, float]] = {}
    for label, path in cfg.checkpoints.items():
        row: dict[str, float] = {}
        answers = _answers(path, reasoning["prompt"], cfg.max_tokens)
        row["reasoning_accuracy"] = float(np.mean(math_accuracy(reasoning["prompt"], answers,
                                                                answer=reasoning["answer"])))
        chat_answers = _answers(path, chat + safety, cfg.max_tokens)
        for name, scorer in scorers.items():
            row[f"{name}_score"] = float(np.mean(scorer(chat + safety, chat_answers)))
        table[label] = row
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(table, indent=2))
    return {"table": table}
