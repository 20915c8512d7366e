"""Token-budget micro-batches (train.micro_batch_tokens): rows packed padding-free give the same GRPO loss
and parameter update as the padded rows in one micro-batch (fp32, 1e-5) for every loss aggregation, GSPO's
sequence ratio and a sequence-level IS correction, with routing replay, the balance losses and
per-sequence token dropping on; any token budget gives the same update (micro-batch split invariance)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

import model
from align.grpo.loss import GRPOLoss
from engine.config import EngineConfig, OptimConfig, TrainConfig
from engine.train import TrainWorker
from engine.train.packing import token_budget_micro_batches
from tests.fsdp_fixture import TINY, one_thread

single_thread = pytest.fixture(scope="module", autouse=True)(one_thread)

MOE = dict(TINY, expert_balance_alpha=0.01, device_balance_alpha=0.02, comm_balance_alpha=0.03, balance_devices=2)
OPT = dict(lr=0.05, eps=1.0, max_grad_norm=None)
CASES = {"seq-mean-token-mean": dict(agg="seq-mean-token-mean"),
         "token-mean": dict(agg="token-mean"),
         "token-sum-norm": dict(agg="seq-mean-token-sum-norm"),
         "gspo+geo-mis": dict(agg="seq-mean-token-mean", ratio_level="sequence", is_correction="geo-mis", is_cap=1.5)}


def net():
    m = model.build("tiny", seed=0, **MOE)
    m.set_token_dropping(1.0, per_sequence=True)             # some assignments dropped, per sequence
    return m


def grpo_batch(seed: int = 0, rows: int = 6, T: int = 20) -> dict[str, np.ndarray]:
    """Left-padded prompts, completions of different lengths (right padding), replayed routing, old/ref/behaviour
    log-probs perturbed from the policy's (so ratios, KL and IS weights are not trivial)."""
    rng = np.random.default_rng(seed)
    attn = np.zeros((rows, T), dtype=np.int64)
    loss = np.zeros((rows, T), dtype=np.float32)
    for r in range(rows):
        pad, prompt, completion = r % 3, 4 + r % 2, 3 + (5 * r) % (T - 9)
        attn[r, pad:pad + prompt + completion] = 1
        loss[r, pad + prompt:pad + prompt + completion] = 1
    ids = np.where(attn == 1, rng.integers(3, TINY["vocab_size"], size=(rows, T)), 0)
    m = net().eval()
    with torch.no_grad():
        out = m(torch.from_numpy(ids), torch.from_numpy(attn), return_routing=True,
                logprob_labels=torch.from_numpy(ids[:, 1:]))
    logp = out.token_logprobs.numpy()
    routed = torch.stack(out.routed_experts, 1).numpy()                     # [B, L, T, k]
    noise = lambda s: (s * rng.normal(size=logp.shape)).astype(np.float32)  # noqa: E731
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss, "routed_experts": routed,
            "advantages": rng.normal(size=rows).astype(np.float32), "old_logp": logp + noise(0.05),
            "ref_logp": logp + noise(0.1), "behavior_logp": logp + noise(0.05)}


def loss_fn(case: str) -> GRPOLoss:
    return GRPOLoss(clip_low=0.2, clip_high=0.28, beta=0.04, max_len=16, balance_losses=True, **CASES[case])


def step(budget: int | None, case: str, batch) -> tuple[dict, dict, dict]:
    """(metrics, weights after the step, gradients) of one train_step."""
    w = TrainWorker(net, optim=OptimConfig(**OPT), train=TrainConfig(micro_batch_tokens=budget))
    grads, clip = {}, w._clip
    def record(params):                                      # the summed gradients, before clipping and AdamW
        grads.update({n: p.grad.detach().clone().numpy() for n, p in w.unwrapped.named_parameters()})
        return clip(params)
    w._clip = record
    m = w.train_step(batch, loss_fn(case))
    return m, dict(w.hf_named_arrays()), grads


@pytest.fixture(scope="module")
def batch():
    return grpo_batch()


@pytest.mark.parametrize("case", CASES)
def test_packed_equals_padded(batch, case):
    padded, want, want_grads = step(None, case, batch)
    start = dict(TrainWorker(net).hf_named_arrays())
    for budget in (200, 23):                                 # everything in one row; several micro-batches
        packed, got, got_grads = step(budget, case, batch)
        for n, g in want_grads.items():
            np.testing.assert_allclose(got_grads[n], g, rtol=1e-4, atol=1e-5 * np.abs(g).max(), err_msg=n)
        np.testing.assert_allclose(packed["loss"], padded["loss"], rtol=1e-5, atol=1e-7)
        exact = ("num_tokens", "num_seqs") + (("pg_loss", "kl", "entropy") if budget == 200 else ())
        for k in exact:                  # micro-batch means (kl, entropy) are row-weighted: exact in one micro-batch
            np.testing.assert_allclose(packed[k], padded[k], rtol=1e-5, atol=1e-6, err_msg=k)
        for n in want:
            np.testing.assert_allclose(got[n], want[n], atol=1e-5, rtol=0, err_msg=f"{budget}: {n}")
    assert max(np.abs(want[n] - start[n]).max() for n in want) > 1e-3         # the step moved the weights
    for n, g in want_grads.items():                                           # every weight gets a gradient
        assert np.abs(g).max() > 0, n


def test_micro_batches_hold_whole_sequences_within_budget(batch):
    lengths = batch["attention_mask"].sum(1)
    mbs = token_budget_micro_batches(batch, 23)
    assert len(mbs) > 2
    assert all(mb["input_ids"].shape == (1, int(lengths[mb_rows(mb)].sum())) and mb["input_ids"].shape[1] <= 23
               for mb in mbs)
    assert [r for mb in mbs for r in mb_rows(mb)] == list(range(len(lengths)))     # every row, once, in order
    assert all((mb["input_ids"] != 0).all() for mb in mbs)                          # no padding token
    with pytest.raises(ValueError, match="micro_batch_tokens=5 is smaller than row 0"):
        token_budget_micro_batches(batch, 5)


def mb_rows(mb) -> list[int]:
    return [int(r) for r in mb["seq_rows"]]


def test_train_mode_logprobs_equal_padded(batch):
    pad = TrainWorker(net, optim=OptimConfig(**OPT)).compute_logprobs(batch, mode="train")
    packed = TrainWorker(net, optim=OptimConfig(**OPT), train=TrainConfig(micro_batch_tokens=23))
    got = packed.compute_logprobs(batch, mode="train")
    scored = batch["loss_mask"][:, 1:] == 1
    np.testing.assert_allclose(got[scored], pad[scored], atol=1e-5, rtol=0)


def test_one_micro_batching_option():
    with pytest.raises(ValidationError, match="at most one of train.micro_batch_tokens, optim.micro_batch_size"):
        EngineConfig(train={"micro_batch_tokens": 64}, optim={"grad_accum": 2})
    EngineConfig(train={"micro_batch_tokens": 64})
