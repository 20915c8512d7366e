"""The pipeline's closing table: SFT vs GRPO stage 1 vs stage 2 on the same held-out prompts.

For every checkpoint, greedy answers to three held-out sets (disjoint from training by the bundled
hash split), each scored by its own judge:
  reasoning_accuracy  math correctness on >= 1000 arithmetic prompts       (95% Wilson interval)
  helpful_rm_score    the helpful RM on held-out chat prompts               (95% bootstrap interval)
  safety_rm_score     the safety RM on held-out safety prompts, harmful and  (95% bootstrap interval)
                      their benign look-alikes
plus the paired difference of every column between consecutive checkpoints (same prompts; paired
bootstrap). One generator per checkpoint, shut down before the next starts.

Written to <output_dir>: compare.json (table + differences) and per_prompt.json (each column's
prompts and every checkpoint's per-prompt raw scores and answers): `table_from_raw` recomputes the
table from the latter, which is how the tests check it.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from align.data.loading import DataSource, load_rows
from align.eval.engine_chat import EngineChatModel
from align.intervals import paired_difference, summarize
from engine.vllm_mode import VLLMOptions

COLUMNS = {"reasoning_accuracy": "accuracy", "helpful_rm_score": "score", "safety_rm_score": "score"}


class CompareConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    checkpoints: dict[str, str] = Field(..., description="label -> checkpoint dir, in table order")
    reasoning: DataSource = Field(default_factory=lambda: DataSource(source="bundled:reasoning?levels=6&n=1000",
                                                                     split="test"))
    chat: DataSource = Field(default_factory=lambda: DataSource(source="bundled:helpful_pairs?n=128", split="test"),
                             description="prompts the helpful RM scores")
    safety: DataSource = Field(default_factory=lambda: DataSource(source="bundled:safety?n=192", split="test"),
                               description="prompts the safety RM scores (harmful and benign look-alikes)")
    helpful_rm: str | None = None
    safety_rm: str | None = None
    max_tokens: int = Field(48, ge=1)
    generator: Literal["auto", "vllm", "native"] = Field(
        "native", description="rollout engine for the answers; native = our decoder in fp32 (exact greedy)")
    vllm: VLLMOptions = Field(default_factory=VLLMOptions, description="how vLLM runs when generator is vllm")
    seed: int = Field(0, description="bootstrap seed")
    output_dir: str = "runs/compare"


def _answers(generator: EngineChatModel, prompts: list[str], max_tokens: int) -> list[str]:
    """Greedy single-turn replies, all prompts in one batch."""
    return generator.chat([[{"role": "user", "content": p}] for p in prompts], 0.0, max_tokens)


def table_from_raw(raw: dict, seed: int = 0) -> tuple[dict, dict]:
    """(table, differences) from per_prompt.json's content: {column: {scores: {label: [float]}}}.

    table[label][column] = {mean, lo, hi, n, interval}; differences["b - a"][column] = the paired
    difference of consecutive checkpoints a -> b, same fields."""
    table: dict[str, dict] = {}
    diffs: dict[str, dict] = {}
    for column, entry in raw.items():
        labels = list(entry["scores"])
        for label in labels:
            table.setdefault(label, {})[column] = summarize(entry["scores"][label], COLUMNS[column], seed)
        for before, after in zip(labels, labels[1:]):
            diffs.setdefault(f"{after} - {before}", {})[column] = paired_difference(
                entry["scores"][before], entry["scores"][after], seed)
    return table, diffs


def _load(src: DataSource, required: tuple[str, ...]) -> dict[str, list]:
    return load_rows(src.source, src.split, src.columns, required)[0].to_dict()


def run_compare(cfg: CompareConfig) -> dict:
    from rewards.model_reward import RewardModelScorer
    from rewards.rule import math_accuracy

    reasoning = _load(cfg.reasoning, ("prompt", "answer"))
    sets = {"reasoning_accuracy": reasoning["prompt"]}
    rms = {}
    if cfg.helpful_rm:
        sets["helpful_rm_score"], rms["helpful_rm_score"] = _load(cfg.chat, ("prompt",))["prompt"], cfg.helpful_rm
    if cfg.safety_rm:
        safety = _load(cfg.safety, ("prompt",))
        sets["safety_rm_score"], rms["safety_rm_score"] = safety["prompt"], cfg.safety_rm
    raw: dict[str, dict] = {c: {"prompts": p, "scores": {}, "answers": {}} for c, p in sets.items()}
    if cfg.safety_rm and "kind" in safety:           # harmful | benign, to split the safety score by kind
        raw["safety_rm_score"]["kind"] = safety["kind"]
    seconds: dict[str, float] = {}
    everything = [p for prompts in sets.values() for p in prompts]
    for label, path in cfg.checkpoints.items():
        t0 = time.perf_counter()
        generator = EngineChatModel(path, cfg.generator, vllm=cfg.vllm)  # one per checkpoint, closed after use
        try:
            answers = _answers(generator, everything, cfg.max_tokens)
        finally:
            generator.close()
        seconds[f"generate/{label}"] = round(time.perf_counter() - t0, 1)
        start = 0
        for column, prompts in sets.items():
            raw[column]["answers"][label] = answers[start:start + len(prompts)]
            start += len(prompts)
        ans = raw["reasoning_accuracy"]["answers"][label]
        raw["reasoning_accuracy"]["scores"][label] = [float(s) for s in math_accuracy(
            reasoning["prompt"], ans, answer=reasoning["answer"])]
    for column, path in rms.items():                 # each RM once, on its own prompts, for every checkpoint
        t0 = time.perf_counter()
        scorer = RewardModelScorer(path)
        for label in cfg.checkpoints:
            raw[column]["scores"][label] = [float(s) for s in scorer(raw[column]["prompts"],
                                                                     raw[column]["answers"][label])]
        seconds[f"score/{column}"] = round(time.perf_counter() - t0, 1)
    table, diffs = table_from_raw(raw, cfg.seed)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "per_prompt.json").write_text(json.dumps(raw))
    result = {"table": table, "differences": diffs, "compare_seconds": seconds}
    (out / "compare.json").write_text(json.dumps(result, indent=2))
    return result
