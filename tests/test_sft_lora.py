"""LoRA SFT on MLA projections and routed-expert 3-D tensors; packing; atomic checkpoint writes.

Oracles: the trainable-parameter count worked out by hand from r and the targeted shapes of the tiny
preset, and the PEFT adapter model's own logits (the merged checkpoint must reproduce them, atol 1e-5).
A few optimizer steps each, so the file runs in well under a minute on 2 cores.
"""

import json

import pytest
import torch
from peft import PeftModel

from align.data.loading import DataSource
from align.models import load_policy, load_tokenizer, save_atomically, tiny_config
from align.sft import LoraSettings, SFTConfig, run_sft

torch.manual_seed(0)
DATA = [DataSource(source="bundled:reasoning_sft?levels=1,2&n=48")]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny causal-LM checkpoint (random init) with its tokenizer, as SFT would start from."""
    d = tmp_path_factory.mktemp("base")
    load_policy("tiny", seed=0).save_pretrained(d)
    load_tokenizer("tiny").save_pretrained(d)
    return d


def hand_count(r: int) -> int:
    """LoRA adds r * (in + out) per targeted matrix; a 3-D expert tensor (E, out, in) gets r * E * (in + out)."""
    c = tiny_config()
    h, heads = c.hidden_size, c.num_attention_heads
    attn = (
        r * (h + heads * (c.qk_nope_head_dim + c.qk_rope_head_dim))  # q_proj (no q LoRA-rank in the preset)
        + r * (h + c.kv_lora_rank + c.qk_rope_head_dim)  # kv_a_proj_with_mqa
        + r * (c.kv_lora_rank + heads * (c.qk_nope_head_dim + c.v_head_dim))  # kv_b_proj
        + r * (heads * c.v_head_dim + h)  # o_proj
    )
    e, i = c.n_routed_experts, c.moe_intermediate_size
    experts = r * e * (h + 2 * i) + r * e * (i + h)  # gate_up_proj (E, 2I, H), down_proj (E, H, I)
    moe_layers = c.num_hidden_layers - c.first_k_dense_replace
    return c.num_hidden_layers * attn + moe_layers * experts


def test_hand_count_of_the_preset():
    # 4 layers * 2624r (attention) + 3 MoE layers * 7168r (experts) = 32000r
    assert hand_count(1) == 32000


def test_lora_counts_and_merge_matches_adapter(base_dir, tmp_path):
    r = 4
    cfg = SFTConfig(
        model=str(base_dir), train_data=DATA, max_len=96, max_steps=4, lr=1e-2, batch_size=8,
        lora=LoraSettings(r=r, alpha=8), merge_lora_on_save=True, output_dir=str(tmp_path / "sft"),
    )
    out = run_sft(cfg)
    m = out["metrics"]
    assert m["trainable_params"] == hand_count(r) == 128000
    assert m["total_params"] == sum(p.numel() for p in load_policy("tiny").parameters()) + hand_count(r)
    assert out["output_path"] == str(tmp_path / "sft" / "model")

    ids = torch.tensor([[1, 4, 204, 300, 301, 302, 2, 204, 5, 204, 17, 18]])
    base = load_policy(str(base_dir)).eval()
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    adapted = PeftModel.from_pretrained(load_policy(str(base_dir)), str(tmp_path / "sft" / "adapter")).eval()
    merged = load_policy(out["output_path"]).eval()
    with torch.no_grad():
        adapter_logits = adapted(input_ids=ids).logits
        merged_logits = merged(input_ids=ids).logits
    assert (adapter_logits - base_logits).abs().max() > 1e-3, "the adapter learned nothing; the check would be vacuous"
    torch.testing.assert_close(merged_logits, adapter_logits, atol=1e-5, rtol=0)
    # the merged checkpoint is a plain model (no LoRA tensors) with its tokenizer beside it
    assert not any("lora" in k for k in merged.state_dict())
    assert load_tokenizer(out["output_path"]).chat_template is not None


def test_lora_needs_zero_dropout_on_expert_tensors():
    with pytest.raises(ValueError, match="dropout must be 0"):
        LoraSettings(dropout=0.1)
    assert LoraSettings(dropout=0.1, target_parameters=[]).dropout == 0.1


def test_packing_trains(base_dir, tmp_path):
    cfg = SFTConfig(model=str(base_dir), train_data=DATA, max_len=128, max_steps=2, lr=1e-3, batch_size=2,
                    packing=True, output_dir=str(tmp_path / "packed"))
    out = run_sft(cfg)
    assert out["metrics"]["train_steps"] == 2 and out["metrics"]["train_loss"] > 0
    assert json.loads((tmp_path / "packed" / "model" / "config.json").read_text())["model_type"] == "deepseek_v2"


def test_save_atomically_replaces_whole_dir_and_keeps_old_on_failure(tmp_path):
    final = tmp_path / "ckpt"

    def write(text):
        return lambda d: (d / "weights.txt").write_text(text)

    save_atomically(write("v1"), final)
    save_atomically(write("v2"), final)
    assert (final / "weights.txt").read_text() == "v2"

    def crash(d):
        (d / "weights.txt").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_atomically(crash, final)
    assert (final / "weights.txt").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp dirs left behind
