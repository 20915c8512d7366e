"""`align plan RECIPE`: memory per GPU and per phase of a GRPO recipe, before anything is launched.

Nothing is allocated: the network is built on the meta device from a preset name or a checkpoint's
config.json, and the bytes follow from the engine config. Per GPU (the one that also hosts the rollout
engine, the fullest), per phase (rollout, reward, reference, train): weights, gradients, optimizer state,
activations, vLLM weights and KV cache, and whether the phase fits in --gpu-memory.

What each rank holds (sharded over S = world_size / replicas ranks under fsdp2, S = 1 otherwise):
fp32 parameters 4P/S, fp32 gradients 4P/S, AdamW's two fp32 moments 8P/S, the reference 4P/S; under
fsdp2 a gathered bf16 copy of the largest decoder layer (twice: current + prefetched) while computing;
cpu_offload moves the shards to host memory. Offloading between phases follows the engine: with
sharding=none and real offloading (GPUs) only a phase's own items stay; under fsdp2 the trainer's
shards stay and vLLM sleeps outside the rollout phase. Activations are an estimate (saved tensors per
token per layer; one layer's input only with gradient checkpointing) plus one log-prob chunk.

Expert parallelism (train.ep_size, engine/train/expert_parallel.py): every shard still lives on one rank,
so the per-rank shards stay 1/world_size; what changes is the gathered layer: a rank unshards the
layer's other weights but only its E/ep_size routed experts (without EP it gathers all E), plus the
all-to-all send and receive buffers of the routed rows. Packing (train.micro_batch_tokens): a
micro-batch holds at most that many tokens (padding-free); without it, micro_batch_size rows padded to
prompt + max_tokens. Not yet counted: reward models hosted on the GPU, expert load imbalance.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

GiB = 2**30


@dataclass
class Shape:
    """Parameter counts of a network, from the meta device."""

    total: int
    largest_layer: int
    config: object
    layer_experts: int = 0             # routed-expert parameters of one MoE layer (all E experts)

    @classmethod
    def of(cls, init_from: str) -> Shape:
        import model
        from model.checkpoint import load_config
        from model.network import DeepseekV2LM

        if init_from in model.PRESETS:
            config = model.make_config(init_from)
        elif (Path(init_from) / "config.json").is_file():
            config = load_config(init_from)
        else:
            raise ValueError(f"{init_from}: neither a model preset ({', '.join(model.PRESETS)}) nor a checkpoint "
                             "dir with config.json")
        with torch.device("meta"):
            net = DeepseekV2LM(config)
        layers = [sum(p.numel() for p in layer.parameters()) for layer in net.model.layers]
        experts = [sum(p.numel() for p in layer.mlp.experts.parameters()) for layer in net.model.layers if layer.is_moe]
        return cls(sum(p.numel() for p in net.parameters()), max(layers), config, max(experts, default=0))


@dataclass
class Phase:
    name: str
    weights: float = 0
    grads: float = 0
    optimizer: float = 0
    activations: float = 0
    vllm_weights: float = 0
    kv_cache: float = 0

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.vllm_weights + self.kv_cache


@dataclass
class Plan:
    model: str
    params: int
    gpus: int
    gpu_bytes: float
    rank: dict[str, float]                 # what one training rank holds: params, grads, optimizer, reference
    host_per_rank: float
    phases: list[Phase] = field(default_factory=list)
    adapter_params: int = 0                # LoRA: what trains (grads, AdamW); the base is the reference
    ep_size: int = 1
    gathered: float = 0.0                  # bytes of the unsharded layer(s) while computing (fsdp2)
    micro_batch_tokens: int = 0            # tokens per training micro-batch (packed or padded rows)
    reference_saved: float = 0.0           # LoRA: bytes per rank of the reference copy it does not load

    def fits(self, phase: Phase) -> bool:
        return phase.total <= self.gpu_bytes


def activation_bytes(config, tokens: int, dtype_bytes: int, checkpointing: bool, chunk_tokens: int) -> float:
    """Saved activations of one micro-batch's forward (an estimate) + one log-prob chunk's fp32 logits."""
    c = config
    H, D = c.num_attention_heads, c.hidden_size
    q_head = c.qk_nope_head_dim + c.qk_rope_head_dim
    attn = 6 * D + (c.q_lora_rank or 0) + c.kv_lora_rank + c.qk_rope_head_dim + H * (3 * q_head + 3 * c.v_head_dim)
    if c.n_routed_experts:
        ffn = 4 * D + 3 * c.moe_intermediate_size * (c.num_experts_per_tok + (c.n_shared_experts or 0)) \
            + 2 * c.n_routed_experts
    else:
        ffn = 4 * D + 3 * c.intermediate_size
    layer = tokens * (attn + ffn) * dtype_bytes
    L = c.num_hidden_layers
    stack = tokens * D * dtype_bytes * L + layer if checkpointing else layer * L
    return stack + min(chunk_tokens, tokens) * c.vocab_size * 4 * 3


def make_plan(cfg, gpus: int | None = None, gpu_memory_gib: float = 80.0, prompt_tokens: int = 512) -> Plan:
    """cfg: a GRPOConfig. gpus: training ranks (default: the recipe's train.world_size)."""
    e = cfg.engine
    t, o = e.train, e.optim
    shape = Shape.of(cfg.init_from)
    P = shape.total
    world = gpus or t.world_size
    sharded = t.sharding == "fsdp2"
    S = world // t.replicas if sharded else 1
    compute = 2 if t.mixed_precision in ("bf16", "fp16", "auto") else 4
    from engine.train.lora import count_for

    lora = getattr(cfg, "lora", None) or t.lora          # LoRA: grads + AdamW for the adapters only, no reference
    A = count_for(shape.config, lora) if lora is not None else 0
    trained = A if lora is not None else P
    wants_ref = cfg.beta > 0 or t.reference
    rank = {"params": 4 * (P + A) / S, "grads": 4 * trained / S, "optimizer": 8 * trained / S,
            "reference": 4 * P / S if wants_ref and lora is None else 0.0}
    ep = t.ep_size
    E = getattr(shape.config, "n_routed_experts", None) or 0
    if ep > 1 and (not E or E % ep):
        raise ValueError(f"train.ep_size={ep} does not divide the {E} routed experts of {cfg.init_from}")
    local_layer = shape.largest_layer - shape.layer_experts * (1 - 1 / ep)    # EP: only E/ep experts unshard
    gathered = 2 * compute * local_layer if sharded and S > 1 else 0.0
    on_gpu = {k: (0.0 if t.cpu_offload else v) for k, v in rank.items()}
    host = sum(rank.values()) if t.cpu_offload else 0.0

    rows = cfg.prompts_per_step * cfg.group_size
    T = prompt_tokens + cfg.sampling.max_tokens
    mbs = o.micro_batch_size or math.ceil(rows / world / (o.grad_accum or 1))
    tokens = t.micro_batch_tokens or mbs * T
    act = activation_bytes(shape.config, tokens, compute, t.gradient_checkpointing, t.logprob_chunk_tokens)
    no_grad_act = activation_bytes(shape.config, tokens, compute, True, t.logprob_chunk_tokens) / shape.config.num_hidden_layers
    if ep > 1:                         # all-to-all: the routed rows sent and received (one layer at a time)
        dispatch = 2 * tokens * (shape.config.num_experts_per_tok or 0) * shape.config.hidden_size * compute
        act, no_grad_act = act + dispatch, no_grad_act + dispatch

    vllm = e.rollout.backend in ("vllm", "auto")
    tp = int(e.rollout.kwargs.get("tensor_parallel_size", e.rollout.tensor_parallel_size))
    c = shape.config
    vllm_w = 2 * P / tp if vllm else 4 * P
    kv = (e.rollout.vllm.kv_cache_gib * GiB if vllm and e.rollout.vllm.kv_cache_gib
          else rows * T * (c.kv_lora_rank + c.qk_rope_head_dim) * c.num_hidden_layers * 2 / tp)
    colocated = e.cluster.placement == "colocated"
    offload_between = not sharded and e.offload.enabled and colocated and e.offload.mode in ("auto", "real")

    def trainer(keep: set[str], computing: bool = False) -> dict[str, float]:
        items = {k: v for k, v in on_gpu.items() if not offload_between or k in keep}
        return {"weights": items.get("params", 0) + items.get("reference", 0) + (gathered if computing else 0),
                "optimizer": items.get("optimizer", 0)}

    rollout_w, rollout_kv = (vllm_w, kv) if colocated else (0.0, 0.0)
    asleep = offload_between or sharded                  # vLLM sleeps outside the rollout phase
    phases = [
        Phase("rollout", **trainer(set()), vllm_weights=rollout_w, kv_cache=rollout_kv),
        Phase("reward", **trainer(set()), vllm_weights=0 if asleep else rollout_w, kv_cache=0 if asleep else rollout_kv),
        Phase("reference", **trainer({"reference"}, True), activations=no_grad_act,
              vllm_weights=0 if asleep else rollout_w, kv_cache=0 if asleep else rollout_kv),
        Phase("train", **trainer({"params", "optimizer"}, True), grads=on_gpu["grads"], activations=act,
              vllm_weights=0 if asleep else rollout_w, kv_cache=0 if asleep else rollout_kv),
    ]
    if not colocated:                 # split: each engine's own GPUs (tp per engine) hold its weights and KV cache
        engines = e.rollout.num_engines
        engine_kv = kv if e.rollout.vllm.kv_cache_gib else kv / engines
        phases.append(Phase(f"engine GPU ({engines}x{tp})", vllm_weights=vllm_w, kv_cache=engine_kv))
    return Plan(cfg.init_from, P, world, gpu_memory_gib * GiB, rank, host, phases, A,
                reference_saved=4 * P / S if wants_ref and lora is not None else 0.0, ep_size=ep, gathered=gathered,
                micro_batch_tokens=tokens)


def format_plan(plan: Plan) -> str:
    def gb(x: float) -> str:
        return f"{x / GiB:8.1f}"

    r = plan.rank
    lines = [f"{plan.model}: {plan.params / 1e9:.2f}B parameters on {plan.gpus} GPU(s) of "
             f"{plan.gpu_bytes / GiB:.0f} GiB",
             f"per training rank (GiB): params {r['params'] / GiB:.1f}, grads {r['grads'] / GiB:.1f}, optimizer "
             f"{r['optimizer'] / GiB:.1f}, reference {r['reference'] / GiB:.1f}; host (cpu_offload) "
             f"{plan.host_per_rank / GiB:.1f}",
             f"micro-batch: {plan.micro_batch_tokens} tokens; expert parallelism: ep_size {plan.ep_size}; "
             f"gathered layer while computing {plan.gathered / GiB:.2f} GiB",
             *([f"LoRA: {plan.adapter_params / 1e6:.1f}M adapter parameters train; reference = the base with "
                f"adapters off, {plan.reference_saved / GiB:.1f} GiB per rank not loaded"] if plan.adapter_params else []),
             f"{'phase (GiB/GPU)':<16}{'weights':>8}{'grads':>8}{'optim':>8}{'activ':>8}{'vllm_w':>8}{'kv':>8}"
             f"{'total':>8}  fits"]
    for p in plan.phases:
        lines.append(f"{p.name:<16}{gb(p.weights)}{gb(p.grads)}{gb(p.optimizer)}{gb(p.activations)}"
                     f"{gb(p.vllm_weights)}{gb(p.kv_cache)}{gb(p.total)}  {'yes' if plan.fits(p) else 'NO'}")
    return "\n".join(lines)
