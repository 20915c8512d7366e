"""Weight refit: checkpoint naming vs transformers' own save_pretrained, bucketing, and trainer -> vLLM
refits whose greedy outputs must track the (perturbed) transformers model exactly.

Uses a tokenizer-less checkpoint (token-id prompts), the path test_vllm_rollout.py does not cover.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from engine.refit import RefitStats, buckets, hf_named_tensors
from engine.rollout_vllm import VLLMRollout
from engine.sampling import SamplingConfig

PROMPTS = [[1, 5, 6, 7], [1, 9, 10], [1, 100, 200, 300, 400], [1, 2000, 3, 4, 17, 1023]]
NUM_EXPERTS = 8


def tiny_model(seed: int = 0):
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    torch.manual_seed(seed)
    config = DeepseekV2Config(
        vocab_size=2048, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
        q_lora_rank=None, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=32, v_head_dim=32,
        intermediate_size=512, moe_intermediate_size=128, n_routed_experts=NUM_EXPERTS, n_shared_experts=1,
        num_experts_per_tok=2, first_k_dense_replace=1, n_group=1, topk_group=1, topk_method="greedy",
        norm_topk_prob=False, max_position_embeddings=2048, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return DeepseekV2ForCausalLM(config).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = tiny_model()
    path = tmp_path_factory.mktemp("tiny_dsv2_refit")
    model.save_pretrained(path)
    return model, path


# ---------------------------------------------------------------- naming and bucketing (no vLLM)
def test_hf_named_tensors_equals_save_pretrained(saved):
    model, path = saved
    on_disk = load_file(str(path / "model.safetensors"))
    ours = dict(hf_named_tensors(model))
    assert ours.keys() == on_disk.keys()
    for name, t in on_disk.items():
        assert ours[name].shape == t.shape and torch.equal(ours[name], t), name
    # A plain state dict works too and gives the same thing.
    assert {n: t.data_ptr() for n, t in hf_named_tensors(model.state_dict())} == {n: t.data_ptr() for n, t in ours.items()}


def test_hf_named_tensors_are_views(saved):
    model, _ = saved
    experts = model.model.layers[1].mlp.experts
    ours = dict(hf_named_tensors(model))
    inter = experts.gate_up_proj.shape[1] // 2
    gate, up = ours["model.layers.1.mlp.experts.3.gate_proj.weight"], ours["model.layers.1.mlp.experts.3.up_proj.weight"]
    down = ours["model.layers.1.mlp.experts.3.down_proj.weight"]
    assert gate.data_ptr() == experts.gate_up_proj[3].data_ptr()
    assert up.data_ptr() == experts.gate_up_proj[3, inter:].data_ptr()
    assert down.data_ptr() == experts.down_proj[3].data_ptr()


def test_hf_named_tensors_rejects_bad_expert_shape():
    with pytest.raises(ValueError, match="model.layers.1.mlp.experts.gate_up_proj"):
        list(hf_named_tensors({"model.layers.1.mlp.experts.gate_up_proj": torch.zeros(4, 5)}))


def test_buckets_cover_everything_in_order_within_budget(saved):
    model, _ = saved
    named = list(hf_named_tensors(model))
    budget = 600_000  # smaller than some tensors (embeddings: 2 MB) to exercise the "alone" rule
    got = list(buckets(named, budget))
    flat = [item for b in got for item in b]
    assert [n for n, _ in flat] == [n for n, _ in named]
    for bucket in got:
        size = sum(a.nbytes for _, a in bucket)
        assert size <= budget or len(bucket) == 1
    for (_, t), (_, a) in zip(named, flat):
        assert a.dtype == np.float32 and a.flags.c_contiguous
        np.testing.assert_array_equal(a, t.numpy())
    # float32 contiguous CPU tensors are shared, not copied.
    emb = dict(flat)["model.embed_tokens.weight"]
    assert np.shares_memory(emb, model.model.embed_tokens.weight.detach().numpy())
    # Greedy packing: merging any bucket with the next one's first tensor would overflow.
    for a, b in zip(got, got[1:]):
        assert sum(x.nbytes for _, x in a) + b[0][1].nbytes > budget


def test_buckets_convert_bf16_and_reject_bad_size():
    t = torch.randn(3, 4).to(torch.bfloat16)
    [[(name, arr)]] = list(buckets([("w", t)], 1 << 20))
    assert name == "w" and arr.dtype == np.float32
    np.testing.assert_array_equal(arr, t.float().numpy())
    with pytest.raises(ValueError, match="bucket_bytes"):
        list(buckets([("w", t)], 0))


# ---------------------------------------------------------------- refit into vLLM
@pytest.fixture(scope="module")
def rollout(saved):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the transformers oracle runs far faster single-threaded on 2 busy cores
    _, path = saved
    r = VLLMRollout(path, precision="exact", seed=0, max_model_len=256, kv_cache_gib=1)
    yield r
    r.shutdown()
    torch.set_num_threads(threads)


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


def perturb(model, step: int) -> None:
    """One AdamW step on a next-token loss, plus noise on every expert (routed experts that received
    no tokens get no gradient, and a stale expert cache in vLLM must show up as a mismatch)."""
    torch.manual_seed(100 + step)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(3, 2048, (4, 24))
    model(ids, labels=ids).loss.backward()
    opt.step()
    model.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        for layer in model.model.layers[1:]:
            layer.mlp.experts.gate_up_proj.add_(0.05 * torch.randn_like(layer.mlp.experts.gate_up_proj))
            layer.mlp.experts.down_proj.add_(0.05 * torch.randn_like(layer.mlp.experts.down_proj))


def test_refit_tracks_trainer_three_times(saved, rollout):
    model, _ = saved
    trainer = tiny_model()
    trainer.load_state_dict(model.state_dict())
    n_ckpt_tensors = len(load_file(str(saved[1] / "model.safetensors")))
    n_bytes = 4 * sum(p.numel() for p in trainer.parameters())
    greedy = SamplingConfig(temperature=0.0, max_tokens=12)

    for step in range(3):
        perturb(trainer, step)
        expected = [hf_greedy(trainer, p, 12) for p in PROMPTS]
        stale = [r.token_ids for r in rollout.generate(PROMPTS, greedy)]
        assert stale != expected, "perturbation too small to be detected"

        # As the Ray rollout worker drives it: one load_weights call per bucket, then finish_refit.
        # Small buckets so attention, MLP and expert weights of one layer arrive in different calls.
        stats = [rollout.load_weights(b) for b in buckets(hf_named_tensors(trainer), 1 << 20)]
        rollout.finish_refit()
        assert all(isinstance(st, RefitStats) and st.seconds > 0 and st.mb_per_s > 0 for st in stats)
        assert sum(st.num_tensors for st in stats) == n_ckpt_tensors and len(stats) > 5
        assert sum(st.bytes for st in stats) == n_bytes

        assert [r.token_ids for r in rollout.generate(PROMPTS, greedy)] == expected
        # Sampled log-probs agree too (a stronger check than argmax agreement).
        sampled = rollout.generate(PROMPTS, SamplingConfig(n=2, max_tokens=8, seed=step))
        diffs = []
        for r in sampled:
            ids = torch.tensor([r.prompt_token_ids + r.token_ids])
            with torch.no_grad():
                logp = torch.log_softmax(trainer(ids).logits[0], dim=-1)
            ref = logp[len(r.prompt_token_ids) - 1 : -1].gather(-1, torch.tensor(r.token_ids)[:, None])[:, 0]
            diffs.append((ref - torch.tensor(r.logprobs)).abs())
        assert torch.cat(diffs).mean().item() <= 1e-4


def test_one_shot_refits(saved, rollout):
    """load_weight_buckets (a whole refit from shipped numpy buckets), then a lone load_weights call
    whose refit generate() finishes by itself."""
    model, _ = saved
    fresh = tiny_model(seed=1)
    shipped = [[(n, a.copy()) for n, a in b] for b in buckets(hf_named_tensors(fresh), 4 << 20)]
    stats = rollout.load_weight_buckets(shipped)
    assert stats.num_buckets == len(shipped) and stats.bytes == 4 * sum(p.numel() for p in fresh.parameters())
    greedy = SamplingConfig(temperature=0.0, max_tokens=10)
    assert [r.token_ids for r in rollout.generate(PROMPTS, greedy)] == [hf_greedy(fresh, p, 10) for p in PROMPTS]

    rollout.load_weights(hf_named_tensors(model))
    assert rollout.refit_open
    assert [r.token_ids for r in rollout.generate(PROMPTS, greedy)] == [hf_greedy(model, p, 10) for p in PROMPTS]
    assert not rollout.refit_open


def test_native_refit_with_experts_split_across_buckets(saved):
    """A bucket may end in the middle of a layer's experts: the native backend must still load every slice."""
    from engine.rollout_native import NativeRollout

    source, path = saved
    rollout = NativeRollout(str(path), capture_routing=False)
    with torch.no_grad():                                   # start from other weights
        for p in rollout.network.parameters():
            p.add_(1.0)
    named = list(hf_named_tensors(source))
    got = list(buckets(named, 300_000))                      # expert matrices are 131 KB: 2 per bucket
    assert any(b[0][0].split(".experts.")[0] == b[-1][0].split(".experts.")[0] and ".experts." in b[0][0]
               and ".experts." in got[i + 1][0][0] for i, b in enumerate(got[:-1]))   # a layer's experts do split
    for bucket in got:
        rollout.load_weights(iter(bucket))
    mine = dict(hf_named_tensors(rollout.network))
    assert mine.keys() == dict(named).keys()
    for name, t in named:
        torch.testing.assert_close(mine[name], t, rtol=0, atol=0, msg=name)
