"""Our network against transformers' DeepseekV2/V3 on the same saved weights (the independent oracle)."""
from __future__ import annotations

import pytest
import torch
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

import model

SMALL = dict(vocab_size=300, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
             kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=24, v_head_dim=20, intermediate_size=96,
             moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=2,
             first_k_dense_replace=1, max_position_embeddings=256, tie_word_embeddings=False, pad_token_id=0,
             routed_scaling_factor=1.0, norm_topk_prob=False)

CASES = {
    "v2-lite-style: no q_lora, greedy": (DeepseekV2Config, DeepseekV2ForCausalLM,
                                          dict(q_lora_rank=None, topk_method="greedy", n_group=1, topk_group=1)),
    "v2-style: q_lora, group-limited": (DeepseekV2Config, DeepseekV2ForCausalLM,
                                         dict(q_lora_rank=48, topk_method="group_limited_greedy", n_group=4,
                                              topk_group=2, routed_scaling_factor=2.5)),
    "v3-style: sigmoid gate + bias": (DeepseekV3Config, DeepseekV3ForCausalLM,
                                      dict(q_lora_rank=48, n_group=4, topk_group=2, norm_topk_prob=True,
                                           routed_scaling_factor=2.5)),
    "yarn rope scaling": (DeepseekV2Config, DeepseekV2ForCausalLM,
                          dict(q_lora_rank=None, topk_method="greedy", n_group=1, topk_group=1,
                               rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
                                                "original_max_position_embeddings": 32, "beta_fast": 32,
                                                "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707})),
}


def _reference(config_cls, model_cls, extra, seed=0):
    torch.manual_seed(seed)
    fields = {**SMALL, **extra}
    if config_cls is DeepseekV3Config:
        fields["n_routed_experts"] = fields.pop("n_routed_experts")
    ref = model_cls(config_cls(**fields)).eval()
    with torch.no_grad():  # norms and biases away from their init so a swapped tensor would show
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
        for name, b in ref.named_buffers():
            if "e_score_correction_bias" in name:
                b.copy_(torch.randn_like(b) * 0.05)
    return ref


def _inputs(B=3, T=40):
    ids = torch.randint(1, SMALL["vocab_size"], (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 30:] = 0  # right padding on one row
    return ids, mask


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case, tmp_path):
    ref = _reference(*CASES[case])
    ref.save_pretrained(tmp_path)
    ours = model.from_pretrained(tmp_path)
    ids, mask = _inputs()
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask).logits
    valid = mask.bool()
    diff = (expected - got)[valid].abs().max().item()
    assert diff <= 1e-4, f"{case}: max |logit diff| = {diff}"


def test_long_context_yarn_positions(tmp_path):
    """Positions beyond the original context exercise the interpolated YaRN frequencies."""
    ref = _reference(*CASES["yarn rope scaling"])
    ref.save_pretrained(tmp_path)
    ours = model.from_pretrained(tmp_path)
    ids = torch.randint(1, SMALL["vocab_size"], (1, 200))
    with torch.no_grad():
        diff = (ref(input_ids=ids).logits - ours(ids).logits).abs().max().item()
    assert diff <= 1e-4


def test_round_trip_both_ways(tmp_path):
    """transformers -> ours -> disk -> transformers gives identical tensors and logits."""
    ref = _reference(*CASES["v2-style: q_lora, group-limited"])
    ref.save_pretrained(tmp_path / "hf")
    ours = model.from_pretrained(tmp_path / "hf")
    ours.save_pretrained(tmp_path / "ours")
    back = DeepseekV2ForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    ref_state, back_state = ref.state_dict(), back.state_dict()
    assert ref_state.keys() == back_state.keys()
    for k in ref_state:
        assert torch.equal(ref_state[k], back_state[k]), k
    # our saved file names experts one by one, as DeepSeek-V2-Lite does
    from safetensors import safe_open
    with safe_open(tmp_path / "ours" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.layers.1.mlp.experts.7.gate_proj.weight" in keys
    assert not any(k.endswith("experts.gate_up_proj") for k in keys)
    ids, mask = _inputs()
    with torch.no_grad():  # padded positions are undefined in both, compare the valid ones
        diff = back(input_ids=ids, attention_mask=mask).logits - ours(ids, attention_mask=mask).logits
    assert diff[mask.bool()].abs().max() <= 1e-4
    again = model.from_pretrained(tmp_path / "ours")
    for (n1, p1), (n2, p2) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
