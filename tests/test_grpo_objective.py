"""GRPO's advantages and loss against numbers worked by hand from the formulas."""
from __future__ import annotations

import math

import pytest
import torch

from align.grpo import group_advantages, policy_loss


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 5.0, 3.0])
    # group 1: mean 0.5, sample std sqrt(1/3); group 2: mean 3, std sqrt(((1+1+4+0)/3)) = sqrt(2)
    s1, s2 = math.sqrt(1 / 3), math.sqrt(2.0)
    want = [0.5 / s1, -0.5 / s1, -0.5 / s1, 0.5 / s1, -1 / s2, -1 / s2, 2 / s2, 0.0]
    got = group_advantages(r, 4, scale="group", eps=0.0)
    assert torch.allclose(got, torch.tensor(want), atol=1e-6)
    # Dr. GRPO: centred only
    assert torch.allclose(group_advantages(r, 4, scale="none"), torch.tensor([.5, -.5, -.5, .5, -1, -1, 2, 0]))
    # batch scale: the whole batch's std
    centred = torch.tensor([.5, -.5, -.5, .5, -1, -1, 2, 0])
    assert torch.allclose(group_advantages(r, 4, scale="batch", eps=0.0), centred / r.std(), atol=1e-6)
    # a tied group gets zero advantage, not NaN
    assert torch.equal(group_advantages(torch.ones(4), 4), torch.zeros(4))
    with pytest.raises(ValueError):
        group_advantages(r, 3)


def _case():
    # 2 sequences, 3 token slots; the second sequence has 2 real tokens.
    logp = torch.log(torch.tensor([[0.5, 0.5, 0.2], [0.9, 0.1, 0.3]]))
    old = torch.log(torch.tensor([[0.25, 0.5, 0.2], [0.9, 0.2, 0.3]]))
    ref = torch.log(torch.tensor([[0.5, 0.25, 0.2], [0.45, 0.1, 0.3]]))
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    return logp, old, ref, adv, mask


def _by_hand(beta):
    """Per-token terms worked out from the formula, eps = 0.2."""
    # ratios: [2.0, 1.0, 1.0], [1.0, 0.5, -]; A = +1 then -2
    # min(r A, clip(r) A): seq 1: min(2, 1.2) = 1.2, 1, 1; seq 2: min(-2, -2) = -2, min(-1, -1.6) = -1.6
    surrogate = [[1.2, 1.0, 1.0], [-2.0, -1.6, 0.0]]
    # k3 with ρ = π_ref/π: ρ - ln ρ - 1; seq 1: ρ = 1, 0.5, 1; seq 2: ρ = 0.5, 1
    k = lambda rho: rho - math.log(rho) - 1  # noqa: E731
    kl = [[0.0, k(0.5), 0.0], [k(0.5), 0.0, 0.0]]
    return [[-(surrogate[i][j] - beta * kl[i][j]) for j in range(3)] for i in range(2)]


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_policy_loss_every_aggregation(beta):
    logp, old, ref, adv, mask = _case()
    t = _by_hand(beta)
    want = {
        "token-mean": (t[0][0] + t[0][1] + t[0][2] + t[1][0] + t[1][1]) / 5,
        "seq-mean-token-mean": ((t[0][0] + t[0][1] + t[0][2]) / 3 + (t[1][0] + t[1][1]) / 2) / 2,
        "seq-mean-token-sum-norm": ((t[0][0] + t[0][1] + t[0][2]) / 3 + (t[1][0] + t[1][1]) / 3) / 2,
    }
    for agg, value in want.items():
        loss, metrics = policy_loss(logp, old, ref if beta else None, adv, mask, beta=beta, agg=agg)
        assert math.isclose(loss.item(), value, rel_tol=1e-5), agg
    # clipped tokens: seq 1 token 0 (r=2 > 1.2, A>0) and seq 2 token 1 (r=0.5 < 0.8, A<0): 2 of 5
    assert math.isclose(metrics["clip_frac"], 2 / 5, rel_tol=1e-6)


def test_kl_zero_when_policy_equals_reference():
    logp, old, _, adv, mask = _case()
    _, metrics = policy_loss(logp, old, logp.clone(), adv, mask, beta=0.1)
    assert metrics["kl"] == 0.0
    loss_beta, _ = policy_loss(logp, old, logp.clone(), adv, mask, beta=0.1)
    loss_zero, _ = policy_loss(logp, old, None, adv, mask, beta=0.0)
    assert torch.allclose(loss_beta, loss_zero)


def test_clipped_term_has_no_gradient_outside_trust_region():
    old = torch.log(torch.tensor([[0.2, 0.2, 0.2, 0.2]]))
    # ratios 1.5 (A>0: clipped), 0.5 (A>0: not clipped), 1.1 (inside), 0.5 with A<0 below (clipped)
    logp = torch.log(torch.tensor([[0.3, 0.1, 0.22, 0.1]])).requires_grad_(True)
    adv = torch.tensor([[1.0, 1.0, 1.0, -1.0]])
    loss, _ = policy_loss(logp, old, None, adv, torch.ones(1, 4), beta=0.0, agg="token-mean")
    loss.backward()
    g = logp.grad[0]
    assert g[0] == 0 and g[3] == 0
    assert g[1] != 0 and g[2] != 0


def test_clip_higher_widens_only_the_upper_bound():
    old = torch.log(torch.tensor([[0.2]]))
    logp = torch.log(torch.tensor([[0.3]])).requires_grad_(True)   # ratio 1.5
    loss, m = policy_loss(logp, old, None, torch.tensor([1.0]), torch.ones(1, 1), clip_low=0.2, clip_high=0.28,
                          beta=0.0)
    assert math.isclose(loss.item(), -1.28, rel_tol=1e-6) and m["clip_frac"] == 1.0


def test_global_normalisers_make_micro_batches_sum_to_the_whole():
    logp, old, ref, adv, mask = _case()
    for agg in ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]:
        whole, _ = policy_loss(logp, old, ref, adv, mask, agg=agg)
        parts = sum(policy_loss(logp[i:i + 1], old[i:i + 1], ref[i:i + 1], adv[i:i + 1], mask[i:i + 1], agg=agg,
                                max_len=3, num_seqs=2, num_tokens=float(mask.sum()))[0] for i in range(2))
        assert torch.allclose(whole, parts, atol=1e-6), agg
