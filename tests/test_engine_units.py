"""Engine pieces in-process (no Ray): configs, log-prob maths, the training step, checkpoints, offloading."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_engine_standin import VOCAB, random_batch, tiny_policy, weighted_nll  # noqa: E402

from engine.cluster import MAX_TEMP_DIR_LEN, plan_bundles, ray_temp_dir  # noqa: E402
from engine.config import ClusterConfig, EngineConfig, OptimConfig, TrainConfig  # noqa: E402
from engine.logprobs import entropy, token_logprobs  # noqa: E402
from engine.offload import (DEFAULT_PHASES, Item, ModuleSlot, OffloadedError, OffloadScheduler,  # noqa: E402
                            OptimizerSlot)
from engine.train import TrainWorker, even_slices  # noqa: E402

SGDISH = dict(lr=0.5, eps=1.0, max_grad_norm=None)   # eps=1: AdamW's first step ~ lr*g, sensitive to grad scale


def _params(worker: TrainWorker) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in worker.unwrapped.state_dict().items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


# -- configs ---------------------------------------------------------------------------------------
def test_configs_reject_typos_and_inconsistent_settings():
    with pytest.raises(ValidationError, match="extra"):
        OptimConfig(learning_rate=1e-5)
    with pytest.raises(ValidationError, match="total_steps"):
        OptimConfig(schedule="cosine")
    with pytest.raises(ValidationError, match="not both"):
        OptimConfig(micro_batch_size=2, grad_accum=2)
    with pytest.raises(ValidationError):
        ClusterConfig(placement="spread")
    cfg = EngineConfig.model_validate({"cluster": {"placement": "split", "train_resources": {"train_node": 1}},
                                       "train": {"dp_world_size": 2}})
    assert cfg.cluster.train_resources == {"train_node": 1} and cfg.train.dp_world_size == 2


def test_placement_bundles_for_colocated_and_split():
    colo = ClusterConfig(placement="colocated", train_num_cpus=2, rollout_num_cpus=3,
                         rollout_resources={"a": 1}, train_resources={"a": 0.5, "b": 1})
    assert plan_bundles(colo, 2, use_gpu=True) == [{"CPU": 3, "GPU": 1, "a": 1, "b": 1},
                                                   {"CPU": 2, "GPU": 1, "a": 0.5, "b": 1}]
    split = ClusterConfig(placement="split", rollout_resources={"rollout_node": 1},
                          train_resources={"train_node": 1})
    assert plan_bundles(split, 2, use_gpu=False) == [{"CPU": 1, "rollout_node": 1}, {"CPU": 1, "train_node": 1},
                                                     {"CPU": 1, "train_node": 1}]


def test_ray_temp_dir_is_in_the_run_dir_unless_too_long(tmp_path):
    assert ray_temp_dir(ClusterConfig(), "/tmp/run1") == "/tmp/run1/ray"          # nothing created yet
    assert ray_temp_dir(ClusterConfig(temp_dir="/tmp/raytmp"), "/tmp/run1") == "/tmp/raytmp"
    long_run = tmp_path / ("x" * MAX_TEMP_DIR_LEN)
    short = ray_temp_dir(ClusterConfig(), long_run)
    try:
        assert len(short) <= MAX_TEMP_DIR_LEN and short.startswith("/tmp/deepalign-ray-")
        assert (long_run / "ray").resolve() == Path(short)          # the run dir links to it
    finally:
        Path(short).rmdir()


# -- log-probs -------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_token_logprobs_and_entropy_match_log_softmax(chunk):
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11) * 4
    labels = torch.randint(0, 11, (3, 5))
    oracle = torch.log_softmax(logits.double(), -1)
    want_lp = oracle.gather(-1, labels[..., None])[..., 0]
    want_h = -(oracle.exp() * oracle).sum(-1)
    torch.testing.assert_close(token_logprobs(logits, labels, chunk), want_lp.float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy(logits, chunk), want_h.float(), atol=1e-5, rtol=0)
    assert token_logprobs(logits.bfloat16(), labels, chunk).dtype == torch.float32
    # Gradients flow through the chunked path exactly as through log_softmax.
    x = logits.clone().requires_grad_(True)
    token_logprobs(x, labels, chunk).sum().backward()
    y = logits.clone().requires_grad_(True)
    torch.log_softmax(y, -1).gather(-1, labels[..., None]).sum().backward()
    torch.testing.assert_close(x.grad, y.grad, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="do not match"):
        token_logprobs(logits, labels[:, 1:])


# -- the training step -----------------------------------------------------------------------------
def test_grad_accumulation_equals_one_big_batch():
    batch = random_batch(np.random.default_rng(0), rows=8)
    results = []
    for split in ({}, {"micro_batch_size": 3}, {"grad_accum": 8}):
        w = TrainWorker(tiny_policy, optim=OptimConfig(**SGDISH, **split), train=TrainConfig())
        results.append((w.train_step(batch, weighted_nll), _params(w)))
    (m_big, p_big) = results[0]
    assert m_big["num_tokens"] == batch["loss_mask"][:, 1:].sum()
    for m, p in results[1:]:
        for key in ("loss", "seq_logp", "seq_entropy", "grad_norm"):
            assert m[key] == pytest.approx(m_big[key], rel=1e-5), key
        _assert_same(p, p_big, atol=1e-6)
    # And the step did something: parameters moved by about lr * grad.
    fresh = _params(TrainWorker(tiny_policy, optim=OptimConfig(**SGDISH), train=TrainConfig()))
    assert max((fresh[k] - p_big[k]).abs().max().item() for k in fresh) > 1e-3


def test_token_mean_loss_equals_a_hand_computed_mean():
    batch = random_batch(np.random.default_rng(2), rows=4)
    w = TrainWorker(tiny_policy, optim=OptimConfig(micro_batch_size=1), train=TrainConfig())
    model = tiny_policy()
    model.load_state_dict(w.unwrapped.state_dict())
    with torch.no_grad():
        ids = torch.from_numpy(batch["input_ids"])
        logits = model(input_ids=ids, attention_mask=torch.from_numpy(batch["attention_mask"])).logits
        lp = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, ids[:, 1:, None])[..., 0]
        mask = torch.from_numpy(batch["loss_mask"][:, 1:]).double()
        want = (-lp * torch.from_numpy(batch["weight"]).double()[:, None] * mask).sum() / mask.sum()
    np.testing.assert_allclose(w.compute_logprobs(batch), lp.float().numpy(), atol=1e-5)
    metrics = w.train_step(batch, weighted_nll)                 # 4 micro-batches of one row
    assert metrics["loss"] == pytest.approx(want.item(), rel=1e-5)
    seq_logp = ((lp * mask).sum(1) / mask.sum(1)).mean()        # metrics: row-weighted over micro-batches
    assert metrics["seq_logp"] == pytest.approx(seq_logp.item(), rel=1e-5)


def test_non_finite_gradients_skip_the_step():
    w = TrainWorker(tiny_policy, optim=OptimConfig(lr=1e-2), train=TrainConfig())
    before = _params(w)
    m = w.train_step(random_batch(np.random.default_rng(0), rows=2),
                     lambda fwd, mb: (fwd.token_mean(-fwd.logp) * float("nan"), {}))
    assert m["skipped"] == 1.0 and not math.isfinite(m["grad_norm"])
    _assert_same(_params(w), before, atol=0)
    assert w.get_generation() == 0 and w.scheduler.get_last_lr() == [1e-2]     # weights and schedule unchanged


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
def test_warmup_lr_schedule_values(schedule):
    base, warmup, total = 1e-3, 3, 7
    w = TrainWorker(tiny_policy, optim=OptimConfig(lr=base, warmup_steps=warmup, total_steps=total,
                                                   schedule=schedule), train=TrainConfig())
    batch = random_batch(np.random.default_rng(0), rows=1, length=4)
    got = [w.train_step(batch, weighted_nll)["lr"] for _ in range(total)]

    def want(k: int) -> float:                                  # transformers' schedules, worked by hand
        if k < warmup:
            return base * k / warmup
        progress = (k - warmup) / (total - warmup)
        return base * {"constant": 1.0, "linear": 1.0 - progress,
                       "cosine": 0.5 * (1.0 + math.cos(math.pi * progress))}[schedule]

    assert got == pytest.approx([want(k) for k in range(total)], abs=1e-12)
    assert got[0] == 0.0 and got[warmup] == pytest.approx(base)


def test_mixed_precision_resolution_on_cpu():
    assert TrainWorker(tiny_policy, train=TrainConfig()).accelerator.mixed_precision == "no"
    with pytest.raises(ValueError, match="fp16 needs a CUDA"):
        TrainWorker(tiny_policy, train=TrainConfig(mixed_precision="fp16"))
    w = TrainWorker(tiny_policy, train=TrainConfig(mixed_precision="bf16"))   # asked for explicitly: honoured
    assert w.accelerator.mixed_precision == "bf16"
    assert np.isfinite(w.train_step(random_batch(np.random.default_rng(0), rows=2), weighted_nll)["loss"])
    assert TrainWorker(tiny_policy, train=TrainConfig(mixed_precision="no")).accelerator.mixed_precision == "no"


def test_even_slices_split_rows_like_array_split():
    for n, parts in [(8, 2), (7, 3), (2, 4), (0, 2)]:
        sizes = [s.stop - s.start for s in even_slices(n, parts)]
        assert sizes == [len(a) for a in np.array_split(np.arange(n), parts)]


# -- checkpoints -----------------------------------------------------------------------------------
def test_save_load_resumes_bit_identically(tmp_path):
    rng = np.random.default_rng(0)
    b1, b2 = random_batch(rng, rows=4), random_batch(rng, rows=4)
    optim = OptimConfig(lr=1e-2, warmup_steps=2, total_steps=5, schedule="cosine")
    a = TrainWorker(tiny_policy, optim=optim, train=TrainConfig(seed=3))
    a.train_step(b1, weighted_nll)
    a.save(tmp_path / "ckpt")
    a.save(tmp_path / "ckpt")                                   # overwriting is atomic, not an error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    rng_draw = torch.rand(3)
    m_a = a.train_step(b2, weighted_nll)

    b = TrainWorker(tiny_policy, optim=optim, train=TrainConfig(seed=99))
    assert b.load(tmp_path / "ckpt") == 1 and b.get_generation() == 1
    torch.testing.assert_close(torch.rand(3), rng_draw, atol=0, rtol=0)          # RNG restored
    m_b = b.train_step(b2, weighted_nll)
    assert m_b["lr"] == m_a["lr"] and m_b["loss"] == m_a["loss"]
    _assert_same(_params(a), _params(b), atol=0)
    with pytest.raises(FileNotFoundError, match="trainer_state.json"):
        b.load(tmp_path)


def test_refit_names_are_the_checkpoint_names(tmp_path):
    w = TrainWorker(tiny_policy, train=TrainConfig())
    w.unwrapped.save_pretrained(tmp_path / "hf")
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        on_disk = {k: f.get_tensor(k) for k in f.keys()}
    named = dict(w.hf_named_arrays())
    assert named.keys() == on_disk.keys()
    assert "model.layers.1.mlp.experts.3.up_proj.weight" in named
    for k, arr in named.items():
        np.testing.assert_array_equal(arr, on_disk[k].numpy(), err_msg=k)


# -- offloading ------------------------------------------------------------------------------------
def test_scheduler_residency_per_phase_is_exactly_what_was_declared():
    calls: list[str] = []
    sizes = {"policy": 100, "optimizer": 200, "ref": 100, "rollout_weights": 300, "rollout_kv": 50}
    for mode in ("accounting", "real"):
        calls.clear()
        s = OffloadScheduler(mode=mode)
        for n, b in sizes.items():
            s.register(Item(n, b, lambda n=n: calls.append(f"off:{n}"), lambda n=n: calls.append(f"on:{n}")))
        for phase in ["rollout", "reference", "train", "refit", "reward", "policy", "train"]:
            plan = s.enter(phase)
            assert s.resident == set(DEFAULT_PHASES[phase]) == set(plan.resident)
            assert plan.resident_bytes == sum(sizes[n] for n in DEFAULT_PHASES[phase])
        if mode == "accounting":
            assert calls == []                                  # CPU: plan + log only
        else:                                                   # in each phase offloads come before reloads
            assert calls == ["off:optimizer", "off:policy", "off:ref",           # rollout
                             "off:rollout_kv", "off:rollout_weights", "on:ref",  # reference
                             "off:ref", "on:optimizer", "on:policy",             # train
                             "off:optimizer", "on:rollout_weights",              # refit: weights, not the KV cache
                             "off:policy", "off:rollout_weights",                # reward (nothing declared)
                             "on:policy",                                        # policy
                             "on:optimizer"]                                     # train
    s.declare("reward", ["helpful_rm"])
    s.register(Item("helpful_rm", 50, lambda: None, lambda: None), resident=False)
    assert s.enter("reward").resident == ["helpful_rm"] and s.resident == {"helpful_rm"}
    with pytest.raises(KeyError, match="unknown offload phase"):
        s.enter("nap")


def test_real_offload_round_trip_gives_identical_logits_and_offloaded_forward_fails():
    torch.manual_seed(0)
    model = tiny_policy().eval()
    ids = torch.randint(3, VOCAB, (2, 9))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    slot = ModuleSlot("policy", model, "real")
    nbytes = slot.nbytes
    slot.offload()
    assert all(p.numel() == 0 for p in model.parameters())     # device copies are freed
    assert slot.nbytes == nbytes                                # ... and live in the host buffer
    with pytest.raises(OffloadedError, match="'policy' is offloaded"):
        model(input_ids=ids)
    slot.reload()
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)


def test_real_optimizer_offload_round_trip_and_guard():
    w = TrainWorker(tiny_policy, optim=OptimConfig(lr=1e-3), train=TrainConfig())
    batch = random_batch(np.random.default_rng(0), rows=2)
    w.train_step(batch, weighted_nll)
    opt = w.offloader.slots["optimizer"].optimizer
    saved = [{k: v.clone() for k, v in st.items()} for st in opt.state.values()]
    slot = OptimizerSlot("opt", opt, "real")
    slot.offload()
    assert all(v.numel() == 0 for st in opt.state.values() for v in st.values())
    with pytest.raises(OffloadedError, match="'opt' is offloaded"):
        opt.step()
    slot.reload()
    for st, want in zip(opt.state.values(), saved):
        for k in want:
            assert torch.equal(st[k], want[k])
    # Through the worker: an offloaded policy refuses to train, a reloaded one trains.
    w.offload(["policy", "optimizer"])
    with pytest.raises(OffloadedError):
        w.train_step(batch, weighted_nll)
    w.reload(["policy", "optimizer"])
    assert np.isfinite(w.train_step(batch, weighted_nll)["loss"])
