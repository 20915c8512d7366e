"""Configs for the hybrid engine: where actors run, how the trainer optimises, what gets offloaded.

All are pydantic with extra="forbid" so a typo in a recipe YAML is an error, not a silent default.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator

from engine.vllm_mode import VLLMOptions


class ClusterConfig(BaseModel):
    """Where the Ray actors live. address=None starts a private local Ray; otherwise join that cluster."""

    model_config = ConfigDict(extra="forbid")

    address: str | None = Field(None, description="None = start a local Ray; 'auto' or 'host:port' = join")
    node_ip_address: str | None = Field(
        None, description="IP this driver's node advertises (None = Ray's choice). Ray rewrites 127.0.0.1 to the "
                          "host's address; another loopback address such as 127.0.0.2 keeps a local run on loopback")
    num_cpus: int | None = Field(None, ge=1, description="logical CPUs of a local Ray (None = Ray's default)")
    num_gpus: int | None = Field(None, ge=0, description="GPUs of a local Ray (None = Ray's default)")
    object_store_memory: int | None = Field(None, ge=78_643_200, description="bytes, local Ray only")
    placement: Literal["colocated", "split"] = Field(
        "colocated", description="colocated: rollout and trainer share one bundle and alternate; split: own bundles")
    strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    rollout_num_cpus: float = Field(1.0, gt=0, description="CPUs of the rollout actor's bundle")
    train_num_cpus: float = Field(1.0, gt=0, description="CPUs per training rank")
    actor_threads: int | None = Field(
        None, ge=1, description="torch/OpenMP threads per actor; None = all CPUs of its bundle (colocated actors "
                                "take turns, so each phase gets the whole bundle; Ray's default would be 1)")
    use_gpu: bool | None = Field(None, description="None = use GPUs when the cluster has any")
    rollout_resources: dict[str, float] = Field(
        default_factory=dict, description="custom resources the rollout bundle needs (pins it to nodes); "
                    "colocated merges both dicts into the one bundle")
    train_resources: dict[str, float] = Field(
        default_factory=dict, description="custom resources each training rank's bundle needs")
    temp_dir: str | None = Field(None, description="Ray's temp dir; None = <run_dir>/ray")
    startup_timeout_s: float = Field(300.0, gt=0, description="placement group / actor start-up limit")
    call_timeout_s: float = Field(3600.0, gt=0, description="limit for one generate/train call")


class RolloutConfig(BaseModel):
    """Which generation backend the rollout actor runs, and the backend's own constructor arguments."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["auto", "vllm", "native"] = Field("auto", description="auto = vLLM when importable")
    vllm: VLLMOptions = Field(default_factory=VLLMOptions,
                              description="how vLLM runs (precision, dtype, attention backend, max_model_len); "
                                          "see engine.vllm_mode. Ignored by the native backend")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="passed to the backend constructor "
                                                                     "(over the vllm block's values)")
    refit_bucket_mb: float = Field(64.0, gt=0, description="weight-sync bucket size")
    num_engines: int = Field(1, ge=1, description="rollout actors, each in its own placement bundle; prompts are "
                                                  "spread over them and every one is refit after each update")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per engine (vLLM tensor parallelism; the placement "
                                                           "gives each engine's bundle that many)")
    expert_parallel: bool = Field(False, description="vLLM's enable_expert_parallel (experts split over the TP GPUs)")
    weight_sync: Literal["auto", "object_store", "cuda_ipc", "nccl"] = Field(
        "auto", description="auto = object store on CPU, CUDA IPC colocated on GPU, NCCL split on GPU "
                            "(engine/weight_sync)")
    refit_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype of the refit buckets; auto = the dtype the engine serves")
    refit_checksum: bool = Field(False, description="checksum every refit bucket (a corrupted one is an error)")
    refit_timeout_s: float = Field(600.0, gt=0, description="limit for each refit transfer")
    restart_dead_engines: int = Field(0, ge=0, description="times one generate call may replace each rollout engine "
                                                          "that died (then its share is generated again, same seeds); "
                                                          "0 = a dead engine ends the step with one line naming it")


class OptimConfig(BaseModel):
    """AdamW + an LR schedule with linear warm-up. Micro-batching: set micro_batch_size or grad_accum."""

    model_config = ConfigDict(extra="forbid")

    lr: float = Field(1e-6, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.0, ge=0)
    eps: float = Field(1e-8, gt=0)
    warmup_steps: int = Field(0, ge=0)
    total_steps: int | None = Field(None, ge=1, description="needed by cosine/linear decay")
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    max_grad_norm: float | None = Field(1.0, gt=0, description="None = no clipping")
    fused: bool = Field(True, description="torch's fused AdamW kernel (CPU and CUDA); False = the per-tensor loop, "
                                          "which took ~19% of a 100M-parameter CPU train step")
    micro_batch_size: int | None = Field(None, ge=1, description="rows per forward/backward on one rank")
    grad_accum: int | None = Field(None, ge=1, description="micro-batches per rank per step (instead of size)")

    @model_validator(mode="after")
    def _check(self) -> OptimConfig:
        if self.micro_batch_size is not None and self.grad_accum is not None:
            raise ValueError("optim: set micro_batch_size or grad_accum, not both")
        if self.schedule != "constant" and self.total_steps is None:
            raise ValueError(f"optim.schedule={self.schedule} needs optim.total_steps")
        if self.total_steps is not None and self.warmup_steps > self.total_steps:
            raise ValueError("optim.warmup_steps exceeds optim.total_steps")
        return self


class LoraConfig(BaseModel):
    """LoRA adapters on the policy (peft): the base weights stay frozen, only the adapters train.

    target_modules: linear layers by name suffix (MLA projections by default); target_experts: the routed
    experts' 3-D tensors through peft's parameter targeting (`mlp.experts.gate_up_proj`, `.down_proj`;
    peft allows no dropout there). The frozen base doubles as the reference model (adapters disabled).
    sync: what refit sends to the rollout engine; auto = the adapters where the backend applies them
    (native), else the merged weights of the targeted layers only (vLLM; see engine/lora_sync.py)."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "q_a_proj", "q_b_proj",
                                                               "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"])
    target_experts: list[Literal["gate_up_proj", "down_proj"]] = Field(
        default_factory=lambda: ["gate_up_proj", "down_proj"])
    sync: Literal["auto", "adapter", "merged", "full"] = "auto"

    @model_validator(mode="after")
    def _check(self) -> LoraConfig:
        if self.target_experts and self.dropout:
            raise ValueError("lora.dropout must be 0 when lora.target_experts is set (peft cannot apply it there)")
        if not self.target_modules and not self.target_experts:
            raise ValueError("lora needs target_modules or target_experts")
        return self


class TrainConfig(BaseModel):
    """Training ranks, sharding and numerics of the trainer."""

    model_config = ConfigDict(extra="forbid")

    world_size: int = Field(1, ge=1, validation_alias=AliasChoices("world_size", "dp_world_size"),
                            description="training ranks, one Ray actor each (old name: dp_world_size)")
    sharding: Literal["none", "fsdp2"] = Field(
        "none", description="none = every rank holds the full model (data parallel); fsdp2 = parameters, gradients "
                            "and AdamW state sharded over the ranks (torch FSDP2, per decoder layer and root)")
    replicas: int = Field(1, ge=1, description="fsdp2 only: HSDP replica groups (shard within a group of "
                                               "world_size/replicas ranks, e.g. a node; replicate across groups)")
    cpu_offload: bool = Field(False, description="fsdp2 only: keep parameter shards, gradients and AdamW state in "
                                                 "host memory (FSDP2's CPUOffloadPolicy)")
    gradient_checkpointing: bool = Field(False, description="recompute each decoder layer in the backward")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto", description="auto = bf16 on a GPU that supports it, else no (CPU never gets it unasked); "
                            "fsdp2: bf16 compute with fp32 master weights, fp32 AdamW and fp32 gradient reduction")
    seed: int = 0
    reference: bool = Field(False, description="keep a frozen copy of the initial policy as reference model")
    entropy_grad: bool = Field(False, description="let gradients flow through fwd.entropy (entropy bonus)")
    logprob_chunk_tokens: int = Field(4096, ge=1, description="tokens per log-softmax chunk (memory cap)")
    logprob_micro_batch_size: int | None = Field(
        None, ge=1, description="rows per forward in compute_logprobs (no gradients); None = the optimiser's")
    micro_batch_tokens: int | None = Field(
        None, ge=1, description="token-budget micro-batches: each rank's rows packed padding-free, at most this many "
                                "tokens per forward/backward (engine/train/packing.py); instead of "
                                "optim.micro_batch_size / optim.grad_accum")
    ep_size: int = Field(1, ge=1, description="expert parallelism: routed experts split over groups of ep_size ranks "
                                              "(all-to-all inside a group; engine/train/expert_parallel.py); divides "
                                              "world_size and the routed experts; needs sharding=fsdp2 when > 1")
    lora: LoraConfig | None = Field(None, description="train LoRA adapters only; with reference, the reference "
                                                      "is the base (adapters off), no copy is loaded")

    @property
    def dp_world_size(self) -> int:
        """The old name of world_size."""
        return self.world_size

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.sharding == "none" and (self.replicas > 1 or self.cpu_offload):
            raise ValueError("train.replicas and train.cpu_offload need train.sharding=fsdp2")
        if self.world_size % self.replicas:
            raise ValueError(f"train.replicas={self.replicas} does not divide train.world_size={self.world_size}")
        if self.sharding == "fsdp2" and self.mixed_precision == "fp16":
            raise ValueError("train.sharding=fsdp2 supports mixed_precision bf16, no or auto, not fp16")
        if self.world_size % self.ep_size:
            raise ValueError(f"train.ep_size={self.ep_size} does not divide train.world_size={self.world_size}")
        if self.ep_size > 1 and (self.sharding != "fsdp2" or self.replicas > 1):
            raise ValueError("train.ep_size > 1 needs train.sharding=fsdp2 without train.replicas (HSDP)")
        if self.ep_size > 1 and self.lora is not None and self.lora.target_experts:
            raise ValueError("train.lora.target_experts with train.ep_size > 1: adapters on expert-parallel routed "
                             "experts are not supported yet; set lora.target_experts: [] (attention only)")
        return self


class OffloadConfig(BaseModel):
    """Phase-wise offloading of what a phase does not use (matters when rollout and trainer share a GPU)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    mode: Literal["auto", "real", "accounting"] = Field(
        "auto", description="auto = real on GPUs, accounting (plan + log only) on CPU")


class EngineConfig(BaseModel):
    """Everything the hybrid engine needs, as one block of a recipe."""

    model_config = ConfigDict(extra="forbid")

    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    offload: OffloadConfig = Field(default_factory=OffloadConfig)

    @model_validator(mode="after")
    def _one_micro_batching(self) -> EngineConfig:
        chosen = [n for n, v in (("train.micro_batch_tokens", self.train.micro_batch_tokens),
                                 ("optim.micro_batch_size", self.optim.micro_batch_size),
                                 ("optim.grad_accum", self.optim.grad_accum)) if v is not None]
        if len(chosen) > 1:
            raise ValueError(f"set at most one of train.micro_batch_tokens, optim.micro_batch_size, optim.grad_accum "
                             f"(got {', '.join(chosen)})")
        return self
