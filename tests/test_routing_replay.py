"""Routing replay: the trainer scores rollout tokens with the experts the rollout used."""
from __future__ import annotations

import numpy as np
import torch

import model
from align.grpo.batch import build_batch
from engine.logprobs import token_logprobs
from engine.rollout_native import NativeRollout
from engine.rollout_worker import RolloutWorker
from engine.sampling import SamplingConfig


def near_tied_router_network():
    """Experts 0 and 1 have almost the same router row but very different weights: the absorbed decode
    and the full forward (different float rounding) then pick different experts for some tokens."""
    torch.manual_seed(0)
    net = model.build("tiny", vocab_size=300, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=4, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16,
                      v_head_dim=16, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=4,
                      num_experts_per_tok=1, first_k_dense_replace=1).eval()
    with torch.no_grad():
        for layer in net.model.layers[1:]:
            w = layer.mlp.gate.weight
            w[1] = w[0] + 1e-7 * torch.randn_like(w[0])
            layer.mlp.experts.down_proj[1] *= -20.0
    return net


def trainer_logprobs(net, batch, replay: bool) -> np.ndarray:
    kwargs = {"routed_experts": torch.as_tensor(batch["routed_experts"])} if replay else {}
    with torch.no_grad():
        logits = net(torch.as_tensor(batch["input_ids"]), torch.as_tensor(batch["attention_mask"]), **kwargs).logits
    return token_logprobs(logits[:, :-1], torch.as_tensor(batch["input_ids"])[:, 1:]).numpy()


def test_replay_makes_trainer_logprobs_equal_rollout_logprobs(one_torch_thread):
    net = near_tied_router_network()
    rollout = NativeRollout(network=net)
    prompts = [[int(x) for x in torch.randint(3, 300, (n,))] for n in (5, 9, 7, 12)]
    rollouts = rollout.generate(prompts, SamplingConfig(n=4, temperature=1.0, max_tokens=24, seed=1,
                                                        stop_token_ids=[]))
    batch = build_batch(rollouts, np.zeros(len(rollouts)), False, 0, replay=True)
    mask = batch["loss_mask"][:, 1:].astype(bool)
    sampled = np.zeros_like(batch["loss_mask"][:, 1:])
    for i, r in enumerate(rollouts):
        p = len(r.prompt_token_ids)
        sampled[i, p - 1:p - 1 + len(r.token_ids)] = r.logprobs
    with_replay = np.abs(trainer_logprobs(net, batch, True) - sampled)[mask]
    without = np.abs(trainer_logprobs(net, batch, False) - sampled)[mask]
    assert with_replay.mean() <= 1e-4 and with_replay.max() <= 1e-3
    assert without.max() > 1e-2          # without replay, some tokens were routed differently


PROMPTS = [[5, 9, 17, 3, 44], [12, 7, 7, 200, 31, 9, 8, 1, 90], [70, 60, 50, 40, 30, 20, 10]]


def assert_replay_reproduces(net, rollouts):
    batch = build_batch(rollouts, np.zeros(len(rollouts)), False, 0, replay=True)
    assert batch["routed_experts"].dtype == np.uint8 and batch["routed_experts"].shape[1] == 2   # MoE layers
    mask = batch["loss_mask"][:, 1:].astype(bool)
    sampled = batch["behavior_logp"]
    with_replay = np.abs(trainer_logprobs(net, batch, True) - sampled)[mask]
    assert with_replay.mean() <= 1e-4 and with_replay.max() <= 1e-3, with_replay.max()


def test_replay_aligned_when_the_backend_returns_every_decoder_layer(tmp_path, one_torch_thread):
    """A stand-in in vLLM's layout: routed experts for all 3 decoder layers, the first (dense) one included.
    The rollout worker keeps the MoE layers in MoE-layer order, so replay still reproduces the rollout's
    log-probs (indexing by decoder layer would replay layer 0's rows into MoE layer 1)."""
    net = near_tied_router_network()
    net.save_pretrained(tmp_path)

    class AllDecoderLayers:
        def __init__(self, model_dir):
            self.inner = NativeRollout(network=net)

        def generate(self, prompts, sampling):
            out = self.inner.generate(prompts, sampling)
            for r in out:
                n, k = r.routed_experts[0].shape
                dense = np.full((n, k), 3, dtype=np.int64)               # what a dense layer's rows hold: nothing
                r.routed_experts = [dense] + [x.astype(np.int64) for x in r.routed_experts]
            return out

    worker = RolloutWorker(AllDecoderLayers, str(tmp_path))
    sampling = SamplingConfig(n=4, temperature=1.0, max_tokens=24, seed=1, stop_token_ids=[])
    rollouts = worker.generate(PROMPTS, sampling)
    assert all(len(r.routed_experts) == 2 for r in rollouts)
    assert_replay_reproduces(net, rollouts)


def test_replay_aligned_with_the_native_backend_through_the_worker(tmp_path, one_torch_thread):
    net = near_tied_router_network()
    net.save_pretrained(tmp_path)
    worker = RolloutWorker("native", str(tmp_path))
    rollouts = worker.generate(PROMPTS, SamplingConfig(n=4, temperature=1.0, max_tokens=24, seed=1,
                                                       stop_token_ids=[]))
    assert_replay_reproduces(net, rollouts)


def test_compact_expert_dtypes():
    from engine.sampling import compact_dtype

    assert compact_dtype(64) == np.uint8 and compact_dtype(256) == np.uint8
    assert compact_dtype(257) == np.int16 and compact_dtype(160 * 200) == np.int16
