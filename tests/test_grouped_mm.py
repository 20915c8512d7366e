"""Routed experts as grouped GEMM (torch._grouped_mm) against the per-expert loop and a per-token oracle
(out_t = sum_j g_{t,j} * SwiGLU_{e_{t,j}}(x_t)), forward and backward, fp32 1e-5, with experts that get no
tokens and with dropped assignments; no host sync in the grouped path; the absorbed decode uses the kernel."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

import model
from model.moe import RoutedExperts, grouped_mm_ok
from tests.fsdp_fixture import TINY, one_thread

single_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


class Cfg:
    n_routed_experts, hidden_size, moe_intermediate_size = 6, 16, 8


def experts(seed=0) -> RoutedExperts:
    torch.manual_seed(seed)
    m = RoutedExperts(Cfg)
    with torch.no_grad():
        m.gate_up_proj.normal_(0, 0.3)
        m.down_proj.normal_(0, 0.3)
    return m


def per_token(m: RoutedExperts, x, indices, weights, keep):
    out = []
    for t in range(x.shape[0]):
        acc = torch.zeros(x.shape[1])
        for j in range(indices.shape[1]):
            if keep is None or keep[t, j]:
                e = int(indices[t, j])
                g, u = (m.gate_up_proj[e] @ x[t]).chunk(2)
                acc = acc + weights[t, j] * (m.down_proj[e] @ (F.silu(g) * u))
        out.append(acc)
    return torch.stack(out)


def inputs(seed=1, N=11, k=2, used=(0, 2, 3)):
    """Routing that never picks experts 1, 4, 5 (no tokens) and picks expert 3 for one token only."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, Cfg.hidden_size, generator=g, requires_grad=True)
    pool = torch.tensor(used[:2])
    indices = torch.stack([pool[torch.randint(0, 2, (N,), generator=g)], torch.full((N,), -1)], 1)
    indices[:, 1] = torch.where(indices[:, 0] == used[0], used[1], used[0])
    indices[0, 1] = used[2]
    weights = torch.rand(N, k, generator=g, requires_grad=True)
    return x, indices, weights


def grads(m, x, w, y, seed=3):
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed))
    got = torch.autograd.grad(y, [x, w, m.gate_up_proj, m.down_proj], g)
    return got


@pytest.mark.parametrize("dropping", [False, True])
def test_grouped_equals_loop_and_per_token(dropping):
    m = experts()
    x, idx, w = inputs()
    keep = None
    if dropping:
        keep = torch.ones_like(idx, dtype=torch.bool)
        keep[::3, 0] = False
        keep[1, 1] = False
    assert grouped_mm_ok(x, m.gate_up_proj, m.down_proj)
    results = {}
    for mode in (True, False):
        m.grouped = mode
        y = m(x, idx, w, keep)
        results[mode] = (y, grads(m, x, w, y))
    y_ref = per_token(m, x, idx, w, keep)
    ref_grads = grads(m, x, w, y_ref)
    for mode, (y, gs) in results.items():
        torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=0)
        for a, b in zip(gs, ref_grads):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    gu = results[True][1][2]
    assert gu[[1, 4, 5]].abs().max() == 0 and gu[[0, 2, 3]].abs().amin(dim=(1, 2)).min() > 0  # empty experts: 0


def test_every_token_to_one_expert_and_bf16_alignment():
    m = experts()
    x, idx, w = inputs()
    idx = torch.stack([torch.full((x.shape[0],), 5), torch.full((x.shape[0],), 5)], 1)
    m.grouped = True
    torch.testing.assert_close(m(x, idx, w, None), per_token(m, x, idx, w, None), atol=1e-5, rtol=0)
    assert grouped_mm_ok(x.bfloat16(), m.gate_up_proj.bfloat16(), m.down_proj.bfloat16())      # 16*2, 8*2 bytes
    odd = torch.zeros(2, 6, 4, dtype=torch.bfloat16)                                           # 4*2 bytes: loop
    assert not grouped_mm_ok(torch.zeros(3, 4, dtype=torch.bfloat16), odd)


def run_fake(m: RoutedExperts, keep: bool) -> None:
    """Forward + backward on fake tensors (no data): any host read of a device value raises there."""
    x, idx, w = inputs()
    k = torch.rand(idx.shape, generator=torch.Generator().manual_seed(0)) > 0.3 if keep else None
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:     # the fake _grouped_mm takes bf16 only
        fx = mode.from_tensor(x.detach().bfloat16().requires_grad_())
        y = m(fx, mode.from_tensor(idx), mode.from_tensor(w), None if k is None else mode.from_tensor(k))
        y.sum().backward()


@pytest.mark.parametrize("dropping", [False, True])
def test_grouped_path_has_no_host_sync(dropping):
    m = experts().bfloat16()
    m.grouped = True
    run_fake(m, dropping)
    m.grouped = False                                       # positive control: the loop reads counts on the host
    with pytest.raises(DataDependentOutputException):
        run_fake(m, dropping)


def test_decode_uses_the_grouped_kernel(monkeypatch):
    net = model.build("tiny", seed=0, **{**TINY, "hidden_size": 32, "moe_intermediate_size": 16}).eval()
    calls = []
    real = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids = torch.randint(3, 128, (2, 5))
    cache = net.new_cache(2, 8)
    logits, _ = net.decode_step(ids, torch.arange(5).expand(2, 5), torch.ones(2, 5, dtype=torch.long), cache)
    n_moe = TINY["num_hidden_layers"] - TINY["first_k_dense_replace"]
    assert len(calls) == 2 * n_moe                        # gate_up and down per MoE layer
    for layer in net.model.layers:                        # and it decodes what the loop decodes
        if layer.is_moe:
            layer.mlp.experts.grouped = False
    cache = net.new_cache(2, 8)
    want, _ = net.decode_step(ids, torch.arange(5).expand(2, 5), torch.ones(2, 5, dtype=torch.long), cache)
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=0)
