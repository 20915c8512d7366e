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


# -- GSPO: one length-normalised ratio per sequence ----------------------------------------------------
def test_gspo_ratio_is_per_sequence_and_length_normalised():
    logp, old, _, adv, mask = _case()
    # seq 1: log-ratios ln2, 0, 0 -> s_1 = exp(ln2 / 3) = 2^(1/3); seq 2: 0, ln(1/2) (3rd token masked) -> 2^(-1/2)
    s1, s2 = 2 ** (1 / 3), 2 ** (-1 / 2)
    eps_low, eps_high = 0.2, 0.3
    sur1 = min(s1 * 1.0, min(max(s1, 1 - eps_low), 1 + eps_high) * 1.0)          # 1.26 (inside the range)
    sur2 = min(s2 * -2.0, min(max(s2, 1 - eps_low), 1 + eps_high) * -2.0)        # clipped up to 0.8: -1.6
    want = -(sur1 + sur2) / 2                       # seq-mean-token-mean: every token of i carries the same term
    loss, m = policy_loss(logp, old, None, adv, mask, eps_low, eps_high, beta=0.0, ratio_level="sequence")
    assert math.isclose(loss.item(), want, rel_tol=1e-6)
    assert math.isclose(m["ratio_mean"], (3 * s1 + 2 * s2) / 5, rel_tol=1e-6)
    assert math.isclose(m["clip_frac"], 2 / 5, rel_tol=1e-6)                     # seq 2's two tokens
    # token-mean weighs sequences by length: (3 sur1 + 2 sur2) / 5
    loss_tm, _ = policy_loss(logp, old, None, adv, mask, eps_low, eps_high, beta=0.0, agg="token-mean",
                             ratio_level="sequence")
    assert math.isclose(loss_tm.item(), -(3 * sur1 + 2 * sur2) / 5, rel_tol=1e-6)


def test_gspo_gradient_flows_through_every_token_of_the_sequence():
    old = torch.log(torch.tensor([[0.5, 0.5, 0.5]]))
    logp = old.clone().requires_grad_(True)         # s = 1: inside the clip range
    loss, _ = policy_loss(logp, old, None, torch.tensor([1.0]), torch.tensor([[1, 1, 0]]), beta=0.0,
                          ratio_level="sequence")
    loss.backward()
    # d(-s)/d logp_t = -s / |o| = -1/2 for the two masked-in tokens, 0 for the padding
    assert torch.allclose(logp.grad, torch.tensor([[-0.5, -0.5, 0.0]]))


def test_gspo_clip_defaults_in_the_config():
    from align.data.loading import DataSource
    from align.grpo.config import GRPOConfig
    from rewards.combine import RewardComponent

    base = dict(init_from="x", data=[DataSource(source="x.jsonl")], rewards=[RewardComponent(spec="math")])
    gspo = GRPOConfig(**base, ratio_level="sequence")
    assert (gspo.clip_low, gspo.clip_high) == (3e-4, 4e-4)
    assert (GRPOConfig(**base).clip_low, GRPOConfig(**base).clip_high) == (0.2, 0.2)
    assert GRPOConfig(**base, ratio_level="sequence", clip_high=0.01).clip_high == 0.01


# -- importance-sampling corrections of the rollout/trainer mismatch ---------------------------------
def _is_case():
    """old (trainer) and behavior (sampler) log-probs with log ρ = [ln 3, ln 0.25, ln 1.5] and [ln 0.8, ln 0.9, -]."""
    old = torch.zeros(2, 3)
    behavior = -torch.log(torch.tensor([[3.0, 0.25, 1.5], [0.8, 0.9, 1.0]]))
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    return old, behavior, mask


@pytest.mark.parametrize("kind,want", [
    ("tis", [[2.0, 0.25, 1.5], [0.8, 0.9, 1.0]]),                       # min(ρ, 2)
    ("mis", [[0.0, 0.0, 1.0], [1.0, 1.0, 1.0]]),                        # 1 inside [1/2, 2]
    ("seq-tis", [[1.125] * 3, [0.72] * 3]),                             # min(Π ρ, 2): 3 * 0.25 * 1.5 = 1.125
    ("seq-mis", [[1.0] * 3, [1.0] * 3]),                                # 1.125 and 0.72 are inside [1/2, 2]
    ("geo-mis", [[1.0] * 3, [1.0] * 3]),                                # 1.125^(1/3), 0.72^(1/2) inside
])
def test_importance_weights_by_hand(kind, want):
    from align.grpo.objective import importance_weights

    old, behavior, mask = _is_case()
    w, _ = importance_weights(old, behavior, mask, kind, cap=2.0)
    m = mask.bool()
    assert torch.allclose(w[m], torch.tensor(want)[m], atol=1e-6), (kind, w)


def test_sequence_masks_differ_where_the_product_saturates():
    """A long completion with ρ_t = 1.2 everywhere: the product exceeds C, the geometric mean does not."""
    from align.grpo.objective import importance_weights

    old, behavior, mask = torch.zeros(1, 8), torch.full((1, 8), -math.log(1.2)), torch.ones(1, 8)
    seq, _ = importance_weights(old, behavior, mask, "seq-mis", 2.0)          # 1.2^8 = 4.3 > 2: masked
    geo, _ = importance_weights(old, behavior, mask, "geo-mis", 2.0)          # 1.2 inside
    tis, _ = importance_weights(old, behavior, mask, "seq-tis", 2.0)
    assert seq.sum() == 0 and geo.sum() == 8 and torch.allclose(tis, torch.full((1, 8), 2.0))


def test_is_weights_scale_the_surrogate_carry_no_gradient_and_leave_kl_alone():
    old, behavior, mask = _is_case()
    logp = old.clone().requires_grad_(True)          # ratio 1: surrogate = A per token
    ref = old - 0.5                                   # a KL term that is not zero
    adv = torch.tensor([1.0, -1.0])
    w = torch.tensor([[2.0, 0.25, 1.5], [0.8, 0.9, 1.0]])
    k3 = math.exp(-0.5) + 0.5 - 1
    loss, m = policy_loss(logp, old, ref, adv, mask, beta=0.1, agg="token-mean", behavior_logp=behavior,
                          is_correction="tis")
    pg = -(w[0].sum() * 1.0 + (w[1, :2]).sum() * -1.0) / 5
    assert math.isclose(loss.item(), float(pg) + 0.1 * k3, rel_tol=1e-6)     # KL term unweighted
    loss.backward()
    # d/dlogp of -w r A / 5 with r = exp(logp - old) = 1, plus the k3 gradient 0.1 (1 - e^{-0.5}) / 5
    want = (-w * adv[:, None] + 0.1 * (1 - math.exp(-0.5))) / 5 * mask
    assert torch.allclose(logp.grad, want, atol=1e-6)
    assert m["is/corrected_share"] == pytest.approx(1 / 5)                     # only ρ = 3 was truncated
    # w is a constant: nothing flows into old_logp or behavior_logp through it (token ratio: old gets -r A only)
    old2, behavior2 = old.clone().requires_grad_(True), behavior.clone().requires_grad_(True)
    loss2, _ = policy_loss(old.clone(), old2, None, adv, mask, beta=0.0, agg="token-mean", behavior_logp=behavior2,
                           is_correction="tis")
    loss2.backward()
    assert behavior2.grad is None
    assert torch.allclose(old2.grad, w * adv[:, None] / 5 * mask, atol=1e-6)


def test_is_weights_compose_with_gspo():
    old, behavior, mask = _is_case()
    logp = old + torch.log(torch.tensor([[1.1, 1.1, 1.1], [1.0, 1.0, 1.0]]))   # s_1 = 1.1, s_2 = 1
    adv = torch.tensor([1.0, 1.0])
    loss, _ = policy_loss(logp, old, None, adv, mask, 0.5, 0.5, beta=0.0, agg="token-mean",
                          ratio_level="sequence", behavior_logp=behavior, is_correction="seq-tis")
    want = -(1.125 * 1.1 * 3 + 0.72 * 1.0 * 2) / 5
    assert math.isclose(loss.item(), want, rel_tol=1e-6)
    with pytest.raises(ValueError):
        policy_loss(logp, old, None, adv, mask, beta=0.0, is_correction="tis")          # no behavior_logp


# -- KL estimators ----------------------------------------------------------------------------------
def test_kl_estimators_values_and_gradients():
    # x = log π - log π_ref = ln 2 for one token
    logp = torch.log(torch.tensor([[0.5]])).requires_grad_(True)
    ref = torch.log(torch.tensor([[0.25]]))
    x = math.log(2)
    want = {"k1": (x, 1.0), "k2": (x * x / 2, x), "k3": (0.5 + x - 1, 1 - 0.5)}   # (value, d/dlogp)
    for est, (value, grad) in want.items():
        lp = logp.detach().clone().requires_grad_(True)
        loss, m = policy_loss(lp, lp.detach(), ref, torch.tensor([0.0]), torch.ones(1, 1), beta=1.0,
                              kl_estimator=est)
        loss.backward()
        assert math.isclose(m["kl"], value, rel_tol=1e-6) and math.isclose(loss.item(), value, rel_tol=1e-6), est
        assert math.isclose(lp.grad.item(), grad, rel_tol=1e-5), est


def test_defaults_reproduce_the_plain_grpo_numbers():
    """The new keywords at their defaults give bit-identical losses to the call without them."""
    logp, old, ref, adv, mask = _case()
    plain, _ = policy_loss(logp, old, ref, adv, mask)
    explicit, _ = policy_loss(logp, old, ref, adv, mask, ratio_level="token", behavior_logp=old - 0.3,
                              is_correction="none", is_cap=2.0, kl_estimator="k3")
    assert torch.equal(plain, explicit)
    assert math.isclose(plain.item(), ((_by_hand(0.04)[0][0] + _by_hand(0.04)[0][1] + _by_hand(0.04)[0][2]) / 3
                                       + (_by_hand(0.04)[1][0] + _by_hand(0.04)[1][1]) / 2) / 2, rel_tol=1e-5)
