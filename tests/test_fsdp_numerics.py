"""What sharded bf16 training relies on, in one process: chunked log-probs/entropy == full logits (values and
gradients), bf16 compute without NaN on left-padded rows and close to fp32, gradient checkpointing with
the same gradients and a load counter that counts once."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.config import OptimConfig, TrainConfig
from engine.train import TrainWorker
from model.logprobs import chunked_logprobs
import pytest

from tests.fsdp_fixture import batch, kl_loss, one_thread, tiny_net

single_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


def inputs():
    b = batch(0, rows=4, length=16)
    return {k: torch.as_tensor(b[k]) for k in ("input_ids", "attention_mask")}


def full_logits_stats(net, x, temperature=1.0):
    logits = net(**x).logits[:, :-1].float() / temperature
    logp = logits.log_softmax(-1).gather(-1, x["input_ids"][:, 1:, None]).squeeze(-1)
    ent = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    return logp, ent


def grads(net):
    return torch.cat([p.grad.reshape(-1) for p in net.parameters() if p.grad is not None])


def test_chunked_logprobs_equal_full_logits_with_gradients():
    x = inputs()
    net = tiny_net().train()
    logp, ent = full_logits_stats(net, x, 0.7)
    (logp.sum() + 0.3 * ent.sum()).backward()
    want = grads(net)
    net.zero_grad(set_to_none=True)
    out = net(**x, logprob_labels=x["input_ids"][:, 1:], logprob_chunk_tokens=7, temperature=0.7)  # chunks cut rows
    assert out.logits is None                                   # no [B, T, V] tensor came back
    torch.testing.assert_close(out.token_logprobs, logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.token_entropy, ent, atol=1e-5, rtol=0)
    (out.token_logprobs.sum() + 0.3 * out.token_entropy.sum()).backward()
    torch.testing.assert_close(grads(net), want, atol=1e-5, rtol=1e-5)


def test_chunked_logprobs_keep_no_logits_for_the_backward():
    h = torch.randn(2, 64, 16, requires_grad=True)
    w = torch.randn(1000, 16, requires_grad=True)
    labels = torch.randint(0, 1000, (2, 64))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        logp, _ = chunked_logprobs(h, w, labels, chunk_tokens=32)
    assert max(saved) < 32 * 1000                               # not even one chunk's logits are stored
    logp.sum().backward()
    assert h.grad is not None and w.grad is not None


def test_bf16_on_cpu_no_nan_close_to_fp32():
    b = batch(0, rows=4, length=16)                             # rows 1..3 left-padded
    results = {}
    for mp in ("no", "bf16"):
        w = TrainWorker(tiny_net, optim=OptimConfig(lr=1e-3), train=TrainConfig(mixed_precision=mp))
        lp = w.compute_logprobs(b)
        assert torch.isfinite(torch.as_tensor(lp)).all(), mp
        t = {k: torch.as_tensor(v) for k, v in b.items() if k != "temperature"}
        with w.accelerator.autocast():
            out = w.model(t["input_ids"], t["attention_mask"], logprob_labels=t["input_ids"][:, 1:])
        mask = t["loss_mask"][:, 1:]
        loss = -(out.token_logprobs * mask).sum() / mask.sum()
        loss.backward()
        assert torch.isfinite(loss), mp
        results[mp] = (float(loss.detach()), grads(w.unwrapped))
    (l32, g32), (l16, g16) = results["no"], results["bf16"]
    assert abs(l16 - l32) <= 0.02 * abs(l32)
    assert torch.isfinite(g16).all() and F.cosine_similarity(g16, g32, dim=0) >= 0.99


def test_bf16_mask_value_is_finite_and_router_stays_fp32():
    from model.network import causal_mask

    x = inputs()
    pos = (x["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    mask = causal_mask(x["attention_mask"], pos, 16).to(torch.bfloat16)      # as autocast hands it to a kernel
    probs = torch.softmax(torch.zeros(mask.shape, dtype=torch.bfloat16) + mask, dim=-1)  # a plain softmax kernel
    assert torch.isfinite(probs).all()                          # left padding: rows with every key masked
    net = tiny_net()
    router = next(m for m in net.modules() if type(m).__name__ == "Router")
    seen = {}
    router.register_forward_hook(lambda m, a, out: seen.update(scores=out.scores.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net(**inputs())
    assert seen["scores"] == torch.float32


def test_gradient_checkpointing_same_gradients_load_counted_once():
    x = inputs()
    out = {}
    for ckpt in (False, True):
        net = tiny_net().train()
        net.model.gradient_checkpointing = ckpt
        net.reset_router_stats()
        o = net(**x, logprob_labels=x["input_ids"][:, 1:])
        (o.token_logprobs.sum() + o.aux_loss if o.aux_loss is not None else o.token_logprobs.sum()).backward()
        out[ckpt] = (grads(net), [s["load"] for s in net.router_stats()],
                     sum(float(layer.mlp.load.sum()) for layer in net.model.layers if layer.is_moe))
    torch.testing.assert_close(out[True][0], out[False][0], atol=1e-6, rtol=1e-5)
    assert out[True][1] == out[False][1]
    valid = int(x["attention_mask"].sum())
    assert out[True][2] == out[False][2] == valid * 2          # each valid token's top-2, once (1 MoE layer)


def test_gradient_checkpointing_switch_reaches_the_network():
    w = TrainWorker(tiny_net, optim=OptimConfig(), train=TrainConfig(gradient_checkpointing=True))
    assert w.unwrapped.model.gradient_checkpointing
    m = w.train_step(batch(0), kl_loss)
    assert m["step"] == 1.0 and m["grad_norm"] > 0
