"""Routing replay: the trainer scores rollout tokens with the experts the rollout used."""
from __future__ import annotations

import numpy as np
import torch

import model
from align.grpo.batch import build_batch
from engine.logprobs import token_logprobs
from engine.rollout_native import NativeRollout
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


def test_replay_makes_trainer_logprobs_equal_rollout_logprobs():
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
