"""Expert parallelism (train.ep_size=2, fsdp2) on 2 gloo ranks against the 1-rank oracle (no sharding, whole
batch, all experts local): logits, balance-loss values, the loss, every gradient and the weights after 2 AdamW
steps equal (fp32, 1e-5), with routing replay, the three balance losses and per-sequence token dropping on,
with row micro-batches (one rank runs a padding micro-batch), with token-budget packing and with gradient
checkpointing (the backward recomputes the all-to-alls); the DCP checkpoint
resumes at 1 rank and the HF export has the per-expert names. One torch.multiprocessing spawn; no Ray."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

import model
from engine.config import OptimConfig, TrainConfig
from engine.train import TrainWorker, even_slices, split_rows
from engine.train import expert_parallel, sharding
from tests.fsdp_fixture import TINY, kl_loss, one_thread, spawn

MOE = dict(TINY, expert_balance_alpha=0.01, device_balance_alpha=0.02, comm_balance_alpha=0.03, balance_devices=2)
STEPS = 2
CASES = {"rows": dict(optim=dict(micro_batch_size=2), train=dict()),
         "packed": dict(optim=dict(), train=dict(micro_batch_tokens=30)),
         "ckpt": dict(optim=dict(micro_batch_size=2), train=dict(gradient_checkpointing=True))}   # recomputed all-to-alls

single_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


def net():
    m = model.build("tiny", seed=0, **MOE)
    m.set_token_dropping(1.0, per_sequence=True)
    return m


def batch(step: int, rows: int = 5, T: int = 16) -> dict[str, np.ndarray]:
    """Left-padded rows, a scored completion, and the routing an (initial) rollout chose, replayed."""
    rng = np.random.default_rng(step)
    attn = np.ones((rows, T), dtype=np.int64)
    for r in range(rows):
        attn[r, : r % 4] = 0
    ids = np.where(attn == 1, rng.integers(3, TINY["vocab_size"], size=(rows, T)), 0)
    loss_mask = attn.astype(np.float32)
    loss_mask[:, : T // 2] = 0
    with torch.no_grad():
        out = net().eval()(torch.from_numpy(ids), torch.from_numpy(attn), return_routing=True)
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss_mask, "weight": rng.normal(size=rows).astype(np.float32),
            "routed_experts": torch.stack(out.routed_experts, 1).numpy(), "temperature": 0.9}


def loss_fn(fwd, mb):
    """kl_loss (-A logp, token-mean) on packed or padded micro-batches, plus the balance losses (per sequence)."""
    fwd, mb = fwd.per_sequence(mb)
    loss, metrics = kl_loss(fwd, mb)
    return loss + fwd.aux_loss * fwd.num_seqs / max(fwd.global_num_seqs, 1), metrics


def probe(w: TrainWorker) -> dict[str, np.ndarray]:
    """Logits and balance losses of a training-mode forward (no step), gathered experts on every rank alike."""
    b = batch(9)
    with torch.no_grad():
        w.model.train()
        out = w.model(torch.from_numpy(b["input_ids"]), torch.from_numpy(b["attention_mask"]),
                      routed_experts=torch.from_numpy(b["routed_experts"]))
    return {"logits": out.logits.numpy(), **{f"bal_{k}": v.numpy() for k, v in out.balance_losses.items()}}


def run(w: TrainWorker, rank: int = 0, world: int = 1) -> tuple[list[dict], dict[str, np.ndarray]]:
    """STEPS train steps on 5 rows per step (3 + 2 over 2 ranks); -> (metrics per step, first step's grads)."""
    grads, clip = {}, w._clip

    def record(params):                                     # gradients before clipping, gathered (all ranks)
        if not grads:
            for n, p in w.unwrapped.named_parameters():
                grads[n] = sharding.full_tensor(p.grad).detach().numpy().copy()
        return clip(params)

    w._clip = record
    metrics = []
    for step in range(STEPS):
        metrics.append(w.train_step(split_rows(batch(step), even_slices(5, world))[rank], loss_fn))
    return metrics, grads


def worker(case: str, rank: int = 0, world: int = 1) -> TrainWorker:
    c = CASES[case]
    optim = OptimConfig(lr=0.05, eps=1.0, max_grad_norm=0.5, **c["optim"])
    if world == 1:
        return TrainWorker(net, optim=optim, train=TrainConfig(**c["train"]))
    return TrainWorker(net, optim=optim, train=TrainConfig(sharding="fsdp2", world_size=world, ep_size=world,
                                                           **c["train"]), rank=rank, world_size=world)


def ranks(rank: int, world: int, port: int, out: Path) -> None:
    for case in CASES:
        w = worker(case, rank, world)
        w.init_distributed("127.0.0.1", port)
        experts = expert_parallel.routed_experts(w.unwrapped)
        calls = []
        for m in experts:                                   # count the all-to-all dispatches
            m.dispatch = (lambda d: lambda *a: calls.append(1) or d(*a))(m.dispatch)
        held = {**w.held_bytes(), "local_experts": [sharding.local(m.gate_up_proj).shape[0] for m in experts]}
        metrics, grads = run(w, rank, world)
        weights = dict(w.hf_named_arrays())
        logits = probe(w)
        if case == "rows":
            w.save(out / "ckpt", [w.rng_state()] * world)
            w.export_hf(out / "hf")
        held["dispatches"] = len(calls)
        gathered = [None] * world
        dist.all_gather_object(gathered, held)
        if rank == 0:
            np.savez(out / f"{case}_grads.npz", **grads)
            np.savez(out / f"{case}_weights.npz", **weights)
            np.savez(out / f"{case}_probe.npz", **logits)
            (out / f"{case}.json").write_text(json.dumps({"metrics": metrics, "held": gathered}))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ep(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ep")
    spawn(ranks, out)
    return out


@pytest.fixture(scope="module")
def oracle() -> dict:
    got = {}
    for case in CASES:
        w = worker(case)
        metrics, grads = run(w)
        got[case] = dict(metrics=metrics, grads=grads, weights=dict(w.hf_named_arrays()), probe=probe(w))
    return got


def close(got: dict, want: dict, atol: float = 1e-5) -> None:
    assert got.keys() == want.keys()
    for n in want:
        np.testing.assert_allclose(got[n], want[n], atol=atol, rtol=0, err_msg=n)


@pytest.mark.parametrize("case", CASES)
def test_ep2_equals_one_rank(ep, oracle, case):
    want = oracle[case]
    close(dict(np.load(ep / f"{case}_grads.npz")), want["grads"])
    close(dict(np.load(ep / f"{case}_weights.npz")), want["weights"])
    probe_got = dict(np.load(ep / f"{case}_probe.npz"))
    close(probe_got, want["probe"])
    assert {"bal_expert", "bal_device", "bal_comm"} <= probe_got.keys()
    rec = json.loads((ep / f"{case}.json").read_text())["metrics"]
    for got, m in zip(rec, want["metrics"]):
        for k in ("loss", "seq_logp", "grad_norm", "num_tokens", "num_seqs"):
            np.testing.assert_allclose(got[k], m[k], rtol=1e-5, atol=1e-7, err_msg=k)
    assert want["metrics"][0]["grad_norm"] > 0.5                      # clipping was active
    expert_grads = [g for n, g in want["grads"].items() if ".mlp.experts." in n]
    assert expert_grads and all(np.abs(g).max() > 0 for g in expert_grads)


def test_each_rank_holds_half_the_experts(ep):
    held = json.loads((ep / "rows.json").read_text())["held"]
    full = sum(p.numel() * 4 for p in net().parameters())
    moe_layers = TINY["num_hidden_layers"] - TINY["first_k_dense_replace"]
    for h in held:
        assert h["local_experts"] == [TINY["n_routed_experts"] // 2] * moe_layers, h
        assert h["dispatches"] >= moe_layers * STEPS, h         # the experts ran through the all-to-all
        assert abs(h["params"] - full / 2) <= 0.05 * full / 2, h


def test_checkpoint_and_export_have_per_expert_names(ep):
    want = dict(np.load(ep / "rows_weights.npz"))
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in want
    w = worker("rows")
    assert w.load(ep / "ckpt") == STEPS                                # 2 EP ranks' shards, resharded into one
    close(dict(w.hf_named_arrays()), want, atol=0)
    exported = model.from_pretrained(ep / "hf")
    close({n: t.numpy() for n, t in model.to_checkpoint_tensors(exported.state_dict())}, want, atol=0)
