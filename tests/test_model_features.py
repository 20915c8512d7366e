"""What our network adds to transformers' DeepseekV2: absorbed decode, balance losses, dropping, replay."""
from __future__ import annotations

import math

import pytest
import torch

import model
from model.moe import Routing, balance_losses, capacity_keep

SMALL = dict(vocab_size=300, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
             q_lora_rank=None, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=24, v_head_dim=20,
             intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1,
             num_experts_per_tok=2, first_k_dense_replace=1, n_group=1, topk_group=1, max_position_embeddings=256)


def small_net(**overrides):
    torch.manual_seed(0)
    return model.build("tiny", **{**SMALL, **overrides}).eval()


def test_absorbed_decode_matches_full_forward():
    net = small_net(q_lora_rank=16)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22]]                  # ragged: the second row is left-padded
    continuation = torch.randint(1, 300, (2, 6))
    cache = net.new_cache(2, 7 + 6)
    ids = torch.zeros(2, 7, dtype=torch.long)
    key_mask = torch.zeros(2, 13, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, 7 - len(p):] = torch.tensor(p)
        key_mask[i, 7 - len(p):7] = 1
    pos = (key_mask[:, :7].cumsum(-1) - 1).clamp(min=0)
    step_logits, _ = net.decode_step(ids, pos, key_mask[:, :7], cache)
    decoded = [step_logits]
    for t in range(6):
        key_mask[:, 7 + t] = 1
        pos = pos[:, -1:] + 1
        step_logits, _ = net.decode_step(continuation[:, t:t + 1], pos, key_mask[:, :8 + t], cache)
        decoded.append(step_logits)
    for i, p in enumerate(prompts):  # oracle: the unpadded full forward of each row alone
        full = torch.tensor(p + continuation[i].tolist())[None]
        with torch.no_grad():
            logits = net(full).logits[0]
        for t in range(7):
            assert torch.allclose(decoded[t][i], logits[len(p) - 1 + t], atol=1e-4), (i, t)


def test_cache_bytes_per_token_formula():
    net = small_net()
    cfg = net.config
    per_token = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * 2
    assert model.LatentCache.bytes_per_token(cfg, torch.bfloat16) == per_token
    cache = net.new_cache(batch=3, max_len=10)                        # float32 network
    assert cache.nbytes() == 3 * 10 * per_token * 2
    # versus a per-head K/V cache: 2 * H * (d_h + d_R or d_v) values per token per layer
    v2 = model.make_config("v2")
    assert model.LatentCache.values_per_token_per_layer(v2) == 576


def _hand_balance(scores, idx, mask, E, K, D, M):
    """DeepSeek-V2 eqs. 23-31 with explicit loops, one sequence at a time."""
    B, T = mask.shape
    exp_l = dev_l = comm_l = 0.0
    group = E // D
    for b in range(B):
        toks = [t for t in range(T) if mask[b, t]]
        n = len(toks)
        f = [E / (K * n) * sum(1 for t in toks if i in idx[b * T + t].tolist()) for i in range(E)]
        P = [sum(scores[b * T + t, i].item() for t in toks) / n for i in range(E)]
        exp_l += sum(f[i] * P[i] for i in range(E))
        dev_l += sum((sum(f[d * group:(d + 1) * group]) / group) * sum(P[d * group:(d + 1) * group]) for d in range(D))
        for d in range(D):
            sent = sum(1 for t in toks if any(d * group <= e < (d + 1) * group for e in idx[b * T + t].tolist()))
            comm_l += D / (M * n) * sent * sum(P[d * group:(d + 1) * group])
    return exp_l / B, dev_l / B, comm_l / B


def test_balance_losses_equal_hand_computation():
    torch.manual_seed(1)
    B, T, E, K, D, M = 2, 5, 8, 2, 4, 2
    scores = torch.randn(B * T, E).softmax(-1)
    idx = scores.topk(K, dim=-1).indices
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 3:] = False
    got = balance_losses(Routing(scores, idx, scores.gather(1, idx)), mask, B, D, M, (0.003, 0.05, 0.02))
    want = _hand_balance(scores, idx, mask, E, K, D, M)
    assert math.isclose(got["expert"].item(), 0.003 * want[0], rel_tol=1e-5)
    assert math.isclose(got["device"].item(), 0.05 * want[1], rel_tol=1e-5)
    assert math.isclose(got["comm"].item(), 0.02 * want[2], rel_tol=1e-5)
    # each switch works on its own
    only_dev = balance_losses(Routing(scores, idx, scores.gather(1, idx)), mask, B, D, M, (0.0, 0.05, 0.0))
    assert set(only_dev) == {"device"}


def test_forward_returns_balance_losses_only_when_training():
    net = small_net(expert_balance_alpha=0.01, device_balance_alpha=0.02, comm_balance_alpha=0.03,
                    balance_devices=4, n_group=4, topk_group=2, topk_method="group_limited_greedy")
    ids = torch.randint(1, 300, (2, 12))
    net.train()
    out = net(ids, labels=ids)
    assert set(out.balance_losses) == {"expert", "device", "comm"}
    ce = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert torch.allclose(out.loss, ce + out.aux_loss)
    out.loss.backward()  # the balance losses reach the router
    assert net.model.layers[1].mlp.gate.weight.grad.abs().sum() > 0
    net.eval()
    assert net(ids).aux_loss is None


def test_capacity_dropping_keeps_highest_affinity():
    scores = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.8, 0.2], [0.3, 0.7]])
    idx = torch.tensor([[0], [0], [0], [1]])                            # expert 0 gets 3 tokens, expert 1 gets 1
    keep = capacity_keep(Routing(scores, idx, scores.gather(1, idx)), n_experts=2, capacity_factor=1.0)
    # capacity = ceil(1.0 * 4 * 1 / 2) = 2: expert 0 keeps tokens 0 (0.9) and 2 (0.8), drops token 1 (0.6)
    assert keep[:, 0].tolist() == [True, False, True, True]


def test_token_dropping_training_only():
    net = small_net(capacity_factor=0.5)
    ids = torch.randint(1, 300, (2, 16))
    with torch.no_grad():
        eval_logits = net(ids).logits
        net.train()
        train_logits = net(ids).logits
        net.capacity_factor = None
        for layer in net.model.layers:
            if layer.is_moe:
                layer.mlp.capacity_factor = None
        undropped = net(ids).logits
    assert not torch.allclose(train_logits, eval_logits, atol=1e-5)  # capacity 0.5 must drop something
    assert torch.allclose(undropped, eval_logits, atol=1e-6)          # eval never drops


def test_routing_replay_reproduces_logits_exactly():
    net = small_net()
    ids = torch.randint(1, 300, (2, 10))
    with torch.no_grad():
        first = net(ids, return_routing=True)
        replayed = net(ids, routed_experts=first.routed_experts)
        other = [torch.randint(0, 8, r.shape) for r in first.routed_experts]
        forced = net(ids, routed_experts=other, return_routing=True)
    assert torch.equal(first.logits, replayed.logits)
    assert not torch.allclose(first.logits, forced.logits)             # replay really forces the experts
    assert all(torch.equal(a, b) for a, b in zip(forced.routed_experts, other))


def test_sigmoid_bias_update_moves_toward_balance():
    net = small_net(scoring_func="sigmoid", topk_method="noaux_tc", n_group=2, topk_group=2, norm_topk_prob=True)
    with torch.no_grad():
        net(torch.randint(1, 300, (4, 32)))
    moe = net.model.layers[1].mlp
    load = moe.load.clone()
    net.update_routing_bias(0.01)
    bias = moe.gate.e_score_correction_bias
    assert torch.all(bias[load > load.mean()] < 0) and torch.all(bias[load < load.mean()] > 0)
    assert moe.load.sum() == 0 and net.router_stats()[0]["max_over_mean"] == 0


def test_router_stats_report_load():
    net = small_net()
    with torch.no_grad():
        net(torch.randint(1, 300, (2, 8)))
    stats = net.router_stats()
    assert len(stats) == 2 and abs(sum(stats[0]["load"]) - 1) < 1e-6 and stats[0]["max_over_mean"] >= 1


def test_packed_sequences_do_not_attend_across_segments():
    net = small_net()
    a, b = torch.randint(1, 300, (1, 6)), torch.randint(1, 300, (1, 5))
    packed = torch.cat([a, b], dim=1)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4]])
    with torch.no_grad():
        got = net(packed, position_ids=pos).logits[0]
        want = torch.cat([net(a).logits[0], net(b).logits[0]])
    assert torch.allclose(got, want, atol=1e-5)


def test_generate_equals_greedy_full_forward():
    net = small_net()
    prompt = torch.tensor([[3, 4, 5, 6]])
    out = net.generate(prompt, max_new_tokens=8, eos_token_id=[])
    seq = prompt
    with torch.no_grad():
        for _ in range(8):
            seq = torch.cat([seq, net(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


@pytest.mark.parametrize("preset,total,active,tol", [("v2", 236e9, 21e9, 0.02), ("v2-lite", 15.7e9, 2.4e9, 0.025)])
def test_preset_parameter_counts(preset, total, active, tol):
    """Activated = all params a token touches except the embedding lookup (2.45B for V2-Lite vs the stated 2.4B)."""
    with torch.device("meta"):
        net = model.build(preset)
    t, a = model.parameter_counts(net)
    assert abs(t - total) / total < 0.02
    assert abs(a - active) / active < tol
