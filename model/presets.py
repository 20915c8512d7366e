"""Named configurations: `tiny` for CPU tests (vLLM-CPU compatible MLA dims), and the paper's V2-Lite and V2."""
from __future__ import annotations

from transformers import DeepseekV2Config

_COMMON = dict(hidden_act="silu", rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False,
               initializer_range=0.02, pad_token_id=0, bos_token_id=1, eos_token_id=2)

PRESETS: dict[str, dict] = {
    # A few million parameters. kv_lora_rank 512 / qk_rope_head_dim 64 are what vLLM's CPU MLA accepts.
    "tiny": dict(vocab_size=2048, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                 q_lora_rank=None, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=32, v_head_dim=32,
                 intermediate_size=512, moe_intermediate_size=128, n_routed_experts=8, n_shared_experts=1,
                 num_experts_per_tok=2, first_k_dense_replace=1, n_group=1, topk_group=1, topk_method="greedy",
                 norm_topk_prob=False, routed_scaling_factor=1.0, max_position_embeddings=2048,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    # DeepSeek-V2-Lite: 15.7B total, 2.4B activated.
    "v2-lite": dict(vocab_size=102400, hidden_size=2048, num_hidden_layers=27, num_attention_heads=16,
                    num_key_value_heads=16, q_lora_rank=None, kv_lora_rank=512, qk_rope_head_dim=64,
                    qk_nope_head_dim=128, v_head_dim=128, intermediate_size=10944, moe_intermediate_size=1408,
                    n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1,
                    n_group=1, topk_group=1, topk_method="greedy", norm_topk_prob=False, routed_scaling_factor=1.0,
                    max_position_embeddings=163840,
                    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                                     "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
                                     "mscale": 0.707, "mscale_all_dim": 0.707}),
    # DeepSeek-V2: 236B total, 21B activated; device-limited routing to 3 of 8 groups.
    "v2": dict(vocab_size=102400, hidden_size=5120, num_hidden_layers=60, num_attention_heads=128,
               num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64,
               qk_nope_head_dim=128, v_head_dim=128, intermediate_size=12288, moe_intermediate_size=1536,
               n_routed_experts=160, n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1,
               n_group=8, topk_group=3, topk_method="group_limited_greedy", norm_topk_prob=False,
               routed_scaling_factor=16.0, max_position_embeddings=163840,
               rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                                "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
                                "mscale": 0.707, "mscale_all_dim": 0.707}),
}


def make_config(preset: str = "tiny", **overrides) -> DeepseekV2Config:
    """A DeepseekV2Config from a preset; extra keys (balance alphas, capacity_factor, ...) are kept on it."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose from {sorted(PRESETS)}")
    fields = {**_COMMON, **PRESETS[preset], **overrides}
    return DeepseekV2Config(**fields)


def parameter_counts(network) -> tuple[int, int]:
    """(total, activated per token). Activated excludes the routed experts a token does not use and the
    input embedding (a table lookup, not a matmul): V2 21.4B -> 20.8B here vs the paper's 21B."""
    config = network.config
    total = sum(p.numel() for p in network.parameters())
    per_expert = 3 * config.hidden_size * config.moe_intermediate_size
    n_moe = sum(1 for layer in network.model.layers if layer.is_moe)
    idle = (config.n_routed_experts - config.num_experts_per_tok) * per_expert * n_moe
    return total, total - idle - network.get_input_embeddings().weight.numel()
