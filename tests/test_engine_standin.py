"""Shared fixtures of the engine tests: a tiny DeepSeek-V2 policy and an HF-generate rollout stand-in.

The stand-in plays the rollout backend (vLLM / native) in Ray tests: transformers' generate for
sampling, and load_weights() that takes per-expert checkpoint names (what refit sends) back into
transformers' fused expert tensors. The tests here check the stand-in itself, so the engine tests
built on it can be trusted.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

from engine.refit import hf_named_tensors
from engine.sampling import Rollout, SamplingConfig

VOCAB = 256


def tiny_config() -> DeepseekV2Config:
    """Shrunk from the brief's tiny config for speed (no vLLM touches it): MLA + 4 experts, top-2."""
    return DeepseekV2Config(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        q_lora_rank=None, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16,
        intermediate_size=128, moe_intermediate_size=32, n_routed_experts=4, n_shared_experts=1,
        num_experts_per_tok=2, first_k_dense_replace=1, n_group=1, topk_group=1, topk_method="greedy",
        norm_topk_prob=False, max_position_embeddings=256, tie_word_embeddings=False, pad_token_id=0,
        bos_token_id=1, eos_token_id=2)


def tiny_policy() -> DeepseekV2ForCausalLM:
    """Model factory for TrainWorker (the worker seeds torch before calling it)."""
    return DeepseekV2ForCausalLM(tiny_config())


def save_tiny_checkpoint(directory: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    tiny_policy().save_pretrained(directory)
    return directory


def random_batch(rng: np.random.Generator, rows: int = 8, length: int = 12) -> dict[str, np.ndarray]:
    """Token rows with ragged right padding, a loss mask over a 'completion' part and per-row weights."""
    ids = rng.integers(3, VOCAB, (rows, length))
    attn = np.ones((rows, length), dtype=np.int64)
    for r in range(rows):
        attn[r, length - (r % 4):] = 0
    loss_mask = attn.copy()
    loss_mask[:, :4] = 0
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss_mask,
            "weight": rng.normal(size=rows).astype(np.float32)}


def weighted_nll(fwd, mb):
    """A REINFORCE-shaped token-mean loss (share of the global batch, per the engine's contract)."""
    loss = fwd.token_mean(-fwd.logp * mb["weight"][:, None])
    with torch.no_grad():                                   # micro-batch means of per-sequence values
        seq_logp = (fwd.logp * fwd.mask).sum(1) / fwd.mask.sum(1).clamp(min=1)
        seq_entropy = (fwd.entropy * fwd.mask).sum(1) / fwd.mask.sum(1).clamp(min=1)
    return loss, {"seq_logp": float(seq_logp.mean()), "seq_entropy": float(seq_entropy.mean())}


PER_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


class HFGenerateRollout:
    """Rollout backend stand-in: transformers generate + per-expert weight loading; delay_s slows generate."""

    def __init__(self, model_dir, delay_s: float = 0.0):
        self.model = DeepseekV2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.delay_s = delay_s
        self.loaded = 0

    @torch.no_grad()
    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingConfig) -> list[Rollout]:
        time.sleep(self.delay_s)
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        out = []
        for i, prompt in enumerate(prompt_token_ids):
            ids = torch.tensor([prompt]).repeat(sampling.n, 1)
            res = self.model.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=sampling.temperature > 0,
                temperature=sampling.temperature or None, top_k=sampling.top_k or None, top_p=sampling.top_p,
                max_new_tokens=sampling.max_tokens, min_new_tokens=sampling.max_tokens, output_logits=True,
                return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
            new = res.sequences[:, len(prompt):]
            logp = torch.stack(res.logits, 1).float().log_softmax(-1).gather(-1, new[..., None])[..., 0]
            for s in range(sampling.n):
                out.append(Rollout(prompt_index=i, prompt_token_ids=list(prompt), token_ids=new[s].tolist(),
                                   logprobs=logp[s].tolist(), text="", finish_reason="length"))
        return out

    @torch.no_grad()
    def load_weights(self, named) -> None:
        params = dict(self.model.named_parameters())
        for name, array in named:
            t = torch.from_numpy(np.array(array))     # Ray hands over read-only arrays
            m = PER_EXPERT.match(name)
            if m is None:
                params[name].copy_(t)
                continue
            prefix, e, kind = m.group(1), int(m.group(2)), m.group(3)
            if kind == "down_proj":
                params[f"{prefix}.down_proj"][e].copy_(t)
            else:
                fused = params[f"{prefix}.gate_up_proj"][e]
                half = fused.shape[0] // 2
                (fused[:half] if kind == "gate_proj" else fused[half:]).copy_(t)
            self.loaded += 1

    def shutdown(self) -> None:
        self.model = None


def register_for_ray() -> None:
    """Ray workers cannot import tests/ modules: ship this module's functions and classes by value."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


# ---------------------------------------------------------------------------------------------
def test_standin_load_weights_restores_fused_experts(tmp_path):
    torch.manual_seed(0)
    source = tiny_policy()
    backend = HFGenerateRollout(save_tiny_checkpoint(tmp_path / "ckpt", seed=1))
    before = backend.model.state_dict()["model.layers.1.mlp.experts.gate_up_proj"].clone()
    assert not torch.equal(before, source.state_dict()["model.layers.1.mlp.experts.gate_up_proj"])
    backend.load_weights((n, t.numpy().copy()) for n, t in hf_named_tensors(source))
    for name, t in source.state_dict().items():
        assert torch.equal(backend.model.state_dict()[name], t), name
    assert backend.loaded == 3 * 4                          # one MoE layer x 4 experts x gate/up/down


def test_standin_logprobs_match_a_full_forward(tmp_path):
    backend = HFGenerateRollout(save_tiny_checkpoint(tmp_path / "ckpt"))
    prompts = [[1, 5, 9, 11], [1, 7]]
    rollouts = backend.generate(prompts, SamplingConfig(n=2, temperature=1.0, max_tokens=5, seed=3))
    assert [r.prompt_index for r in rollouts] == [0, 0, 1, 1]
    for r in rollouts:
        seq = torch.tensor([r.prompt_token_ids + r.token_ids])
        with torch.no_grad():
            logits = backend.model(seq).logits[0, len(r.prompt_token_ids) - 1:-1]
        oracle = logits.log_softmax(-1).gather(-1, torch.tensor(r.token_ids)[:, None])[:, 0]
        assert len(r.token_ids) == 5
        np.testing.assert_allclose(r.logprobs, oracle.numpy(), atol=1e-4)
