"""The GRPO stage's recipe schema (stage 1: rule rewards; stage 2: c1*helpful + c2*safety + c3*rule)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from align.data.loading import DataSource
from align.grpo.objective import GSPO_CLIP
from engine.config import EngineConfig, LoraConfig
from engine.sampling import SamplingConfig
from rewards.combine import RewardComponent


class HeldOutConfig(BaseModel):
    """Greedy accuracy on held-out prompts, scored by one reward component (e.g. math correctness)."""

    model_config = ConfigDict(extra="forbid")
    data: list[DataSource] = Field(default_factory=list)
    reward: str = Field("math_accuracy", description="registered name or dotted path of the scoring function")
    max_prompts: int = Field(64, ge=1)
    every: int = Field(0, ge=0, description="steps between evaluations; 0 = only at start and end")


class AsyncRolloutConfig(BaseModel):
    """One-step off-policy GRPO (align/grpo/async_rollout.py): the next batch is generated while the trainer
    trains on this one (split placement), so it is sampled by weights one version behind."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = False
    max_staleness: int = Field(1, ge=1, description="a batch sampled more than this many versions before the "
                                                    "weights it would train is never trained on")


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
    clip_low: float | None = Field(None, ge=0, description="None = 0.2 (token ratio) or GSPO's 3e-4 (sequence)")
    clip_high: float | None = Field(None, ge=0, description="> clip_low = DAPO's clip-higher; None = 0.2 or "
                                                            "GSPO's 4e-4")
    beta: float = Field(0.04, ge=0, description="KL weight; 0 = no reference model is loaded")
    kl_estimator: Literal["k1", "k2", "k3"] = Field("k3", description="see align/grpo/objective.py")
    loss_agg: Literal["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"] = "seq-mean-token-mean"
    advantage_scale: Literal["group", "batch", "none"] = "group"
    ratio_level: Literal["token", "sequence"] = Field("token", description="sequence = GSPO")
    is_correction: Literal["none", "tis", "mis", "seq-tis", "seq-mis", "geo-mis"] = Field(
        "none", description="importance-sampling correction of the rollout/trainer mismatch")
    is_cap: float = Field(2.0, gt=1, description="C: truncation cap (tis) or mask band [1/C, C] (mis)")
    dynamic_sampling: bool = Field(False, description="DAPO: keep only groups whose rewards differ, refilling")
    dynamic_sampling_max_rounds: int = Field(3, ge=1, description="rollout rounds per step at most")
    mask_truncated: bool = Field(False, description="no loss on completions cut at max_tokens")
    routing_replay: bool = Field(True, description="force the rollout's experts in the policy's training forward")
    routing_replay_ref: bool = Field(False, description="also force them into the reference model (off: it "
                                                        "routes on its own)")
    capacity_factor: float | None = Field(
        None, gt=0, description="token dropping in training, capacity per sequence; None = off (the rollout "
                                "never drops), whatever the checkpoint's config says")
    balance_losses: bool = Field(False, description="keep MoE balance losses in the RL loss")
    max_reward_failure_share: float = Field(0.5, ge=0, le=1, description="stop when a reward component fails "
                                                                       "on more than this share of a step")
    log_samples: int = Field(4, ge=0, description="completions per step written to samples.jsonl")
    lora: LoraConfig | None = Field(
        None, description="LoRA GRPO: train peft adapters on attention and routed experts; the base with adapters "
                          "off is the reference (no copy loaded); refit sends adapters or merged layers; the "
                          "export is a merged HF checkpoint with the adapter in model/adapter (engine.train.lora)")
    engine: EngineConfig = Field(default_factory=EngineConfig)
    async_rollout: AsyncRolloutConfig = Field(default_factory=AsyncRolloutConfig)
    held_out: HeldOutConfig | None = None
    save_every: int = Field(0, ge=0, description="full checkpoint every N steps (0 = only at the end)")
    keep_last: int = Field(2, ge=1)
    seed: int = 0
    wandb_project: str | None = Field(None, description="also log to W&B (WANDB_MODE=offline works offline)")

    @model_validator(mode="after")
    def _clip_defaults(self) -> GRPOConfig:
        low, high = GSPO_CLIP if self.ratio_level == "sequence" else (0.2, 0.2)
        if self.clip_low is None:
            self.clip_low = low
        if self.clip_high is None:
            self.clip_high = high
        if self.lora is not None:                           # the engine-level block the trainer reads
            if self.engine.train.lora is not None and self.engine.train.lora != self.lora:
                raise ValueError("grpo.lora and grpo.engine.train.lora differ: set grpo.lora only")
            self.engine.train.lora = self.lora
        names = {d.label for d in self.data}
        for c in self.rewards:                              # a typo in a scope would silently score nothing
            unknown = sorted(set((c.where or {}).get("data_source", [])) - names)
            if unknown:
                raise ValueError(f"rewards '{c.label}'.where.data_source names {unknown}, not a data source of "
                                 f"this stage (its sources: {sorted(names)}; set data[].name to rename one)")
        if self.async_rollout.enabled and self.engine.cluster.placement != "split":
            raise ValueError("grpo.async_rollout needs grpo.engine.cluster.placement=split (colocated rollout and "
                             "training share a device and take turns, so there is nothing to overlap)")
        if self.is_correction != "none" and not self.sampling.logprobs:
            raise ValueError(f"is_correction={self.is_correction} needs the rollout's log-probs (sampling.logprobs)")
        return self
