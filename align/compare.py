"""The pipeline's closing table: SFT vs GRPO stage 1 vs stage 2 on the same held-out prompts.

For every checkpoint: greedy held-out reasoning accuracy (math reward), mean helpful-RM and
safety-RM scores of its answers to held-out chat and safety prompts. These are the numbers that
show each stage doing its job (stage 1 raises accuracy; stage 2 raises both RM scores).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from align.data.loading import DataSource, load_rows
from align.eval.engine_chat import EngineChatModel
from engine.vllm_mode import VLLMOptions


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
    generator: Literal["auto", "vllm", "native"] = Field(
        "native", description="rollout engine for the answers; native = our decoder in fp32 (exact greedy)")
    vllm: VLLMOptions = Field(default_factory=VLLMOptions, description="how vLLM runs when generator is vllm")
    output_dir: str = "runs/compare"


def _answers(generator: EngineChatModel, prompts: list[str], max_tokens: int) -> list[str]:
    """Greedy single-turn replies."""
    return generator.chat([[{"role": "user", "content": p}] for p in prompts], 0.0, max_tokens)


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
        generator = EngineChatModel(path, cfg.generator, vllm=cfg.vllm)  # one per checkpoint, closed after use
        try:
            answers = _answers(generator, reasoning["prompt"], cfg.max_tokens)
            chat_answers = _answers(generator, chat + safety, cfg.max_tokens)
        finally:
            generator.close()
        row["reasoning_accuracy"] = float(np.mean(math_accuracy(reasoning["prompt"], answers,
                                                                answer=reasoning["answer"])))
        for name, scorer in scorers.items():
            row[f"{name}_score"] = float(np.mean(scorer(chat + safety, chat_answers)))
        table[label] = row
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(table, indent=2))
    return {"table": table}
