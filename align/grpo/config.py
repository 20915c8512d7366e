"""The GRPO stage's recipe schema (stage 1: rule rewards; stage 2: c1*helpful + c2*safety + c3*rule)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from align.data.loading import DataSource
from engine.config import EngineConfig
from engine.sampling import SamplingConfig
from rewards.combine import RewardComponent


class HeldOutConfig(BaseModel):
    """Greedy accuracy on held-out prompts, scored by one reward component (e.g. math correctness)."""

    model_config = ConfigDict(extra="forbid")
    data: list[DataSource] = Field(default_factory=list)
    reward: str = Field("math_accuracy", description="registered name or dotted path of the scoring function")
    max_prompts: int = Field(64, ge=1)
    every: int = Field(0, ge=0, description="steps between evaluations; 0 = only at start and end")


class GRPOConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    init_from: str = Field(..., description="checkpoint dir (or preset name) the policy starts from")
    data: list[DataSource]
    system_prompt: str | None = None
    rewards: list[RewardComponent]
    steps: int = Field(10, ge=1)
    prompts_per_step: int = Field(8, ge=1)
    group_size: int = Field(8, ge=2, description="G: completions per prompt")
    mu: int = Field(1, ge=1, description="optimizer steps per rollout batch (inner epochs)")
    sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(temperature=1.0, max_tokens=64))
    clip_low: float = Field(0.2, ge=0)
    clip_high: float = Field(0.2, ge=0, description="> clip_low = DAPO's clip-higher")
    beta: float = Field(0.04, ge=0, description="k3 KL weight; 0 = no reference model is loaded")
    loss_agg: Literal["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"] = "seq-mean-token-mean"
    advantage_scale: Literal["group", "batch", "none"] = "group"
    dynamic_sampling: bool = Field(False, description="drop groups whose rewards all tie")
    mask_truncated: bool = Field(False, description="no loss on completions cut at max_tokens")
    routing_replay: bool = Field(True, description="force the rollout's experts in training (native backend)")
    balance_losses: bool = Field(False, description="keep MoE balance losses in the RL loss")
    engine: EngineConfig = Field(default_factory=EngineConfig)
    held_out: HeldOutConfig | None = None
    save_every: int = Field(0, ge=0, description="full checkpoint every N steps (0 = only at the end)")
    keep_last: int = Field(2, ge=1)
    seed: int = 0
    wandb_project: str | None = Field(None, description="also log to W&B (WANDB_MODE=offline works offline)")
