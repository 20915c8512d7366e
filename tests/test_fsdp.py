"""Sharded training (train.sharding=fsdp2) on 2 gloo ranks against a 1-rank oracle (sharding=none, one
process, the whole batch): same parameter updates (with and without the reference model, with
gradient checkpointing, with uneven row and micro-batch counts), a sharded checkpoint resumed at 1 rank,
the HF export, and what each rank holds. One torch.multiprocessing spawn serves the module; no Ray."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist

import model
from engine.config import OptimConfig, TrainConfig
from engine.train import TrainWorker, even_slices, split_rows
from tests.fsdp_fixture import batch, kl_loss, one_thread, spawn, tiny_net

# eps=1: AdamW's first steps are ~SGD, so a gradient off by a factor (a rank counted twice) changes the update.
OPT = OptimConfig(lr=0.05, eps=1.0, max_grad_norm=1.0, micro_batch_size=2)
STEPS = 2
CASES = {"plain": dict(), "ref": dict(reference=True), "ckpt": dict(gradient_checkpointing=True),
         "hsdp": dict(replicas=2), "offload": dict(cpu_offload=True), "bf16": dict(mixed_precision="bf16")}
EXACT = ["plain", "ref", "ckpt", "hsdp", "offload"]          # fp32: equal to the 1-rank oracle within 1e-5
ORACLE_KEYS = ("reference", "gradient_checkpointing")        # the rest is sharding-only

def run_steps(w: TrainWorker, steps: range, rank: int = 0, world: int = 1) -> dict:
    """5 rows per step over `world` ranks (3 + 2: rank 1 runs a padding micro-batch), KL to the reference if any."""
    m = {}
    for step in steps:
        shard = split_rows(batch(step), even_slices(5, world))[rank]
        if w.ref is not None:
            shard["ref_logp"] = w.compute_logprobs(shard, "ref")
        m = w.train_step(shard, kl_loss)
    return m

single_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


def weights(w: TrainWorker) -> dict[str, np.ndarray]:
    return dict(w.hf_named_arrays())


def ranks(rank: int, world: int, port: int, out: Path) -> None:
    for name, extra in CASES.items():
        w = TrainWorker(tiny_net, tiny_net if extra.get("reference") else None, OPT,
                        TrainConfig(sharding="fsdp2", world_size=world, **extra), rank, world)
        built_on_meta = all(p.is_meta for p in w.model.parameters())
        assert built_on_meta == (rank > 0), (rank, built_on_meta)   # rank 1 never holds the full model
        w.init_distributed("127.0.0.1", port)                       # rank 0's weights scattered into the shards
        m = run_steps(w, range(STEPS), rank, world)
        held = w.held_bytes()                              # AdamW state present, the last step's gradients
        got = weights(w)
        if name == "ref":                                  # sharded checkpoint, then one more step
            w.save(out / "ckpt", [w.rng_state()] * world)
            w.export_hf(out / "hf")
            run_steps(w, range(STEPS, STEPS + 1), rank, world)
            after = weights(w)
        if rank == 0:
            np.savez(out / f"{name}.npz", **got)
            if name == "ref":
                np.savez(out / "ref_after.npz", **after)
        gathered = [None] * world
        dist.all_gather_object(gathered, held)
        if rank == 0:
            (out / f"{name}.json").write_text(json.dumps({"metrics": m, "held": gathered}))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    spawn(ranks, out)
    return out


def oracle(**extra) -> TrainWorker:
    extra = {k: v for k, v in extra.items() if k in ORACLE_KEYS}
    return TrainWorker(tiny_net, tiny_net if extra.get("reference") else None, OPT, TrainConfig(**extra))


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray], atol: float = 1e-5) -> None:
    assert got.keys() == want.keys()
    for n in want:
        np.testing.assert_allclose(got[n], want[n], atol=atol, rtol=0, err_msg=n)


@pytest.mark.parametrize("case", EXACT)
def test_two_sharded_ranks_match_one_rank(sharded, case):
    w = oracle(**CASES[case])
    start = weights(w)
    m = run_steps(w, range(STEPS))
    got = dict(np.load(sharded / f"{case}.npz"))
    assert_same(got, weights(w))
    assert max(np.abs(got[n] - start[n]).max() for n in start) > 1e-3      # the steps did move the weights
    rec = json.loads((sharded / f"{case}.json").read_text())["metrics"]
    for k in ("loss", "seq_logp", "grad_norm", "num_tokens", "num_seqs", "step"):
        np.testing.assert_allclose(rec[k], m[k], rtol=1e-5, err_msg=k)


def test_bf16_compute_fp32_master_weights(sharded):
    w = oracle()
    m = run_steps(w, range(STEPS))
    got, want = dict(np.load(sharded / "bf16.npz")), weights(w)
    rec = json.loads((sharded / "bf16.json").read_text())
    assert abs(rec["metrics"]["loss"] - m["loss"]) <= 0.02 * abs(m["loss"])
    assert_same(got, want, atol=1e-3)                            # close to the fp32 run ...
    assert max(np.abs(got[n] - want[n]).max() for n in want) > 1e-7   # ... but it did compute in bf16
    full = sum(p.numel() * 4 for p in tiny_net().parameters())
    for h in rec["held"]:                                        # master weights and AdamW state stay fp32
        assert abs(h["params"] - full / 2) <= 0.05 * full / 2 and abs(h["optimizer"] - full) <= 0.05 * full, h


def test_sharded_checkpoint_resumes_at_one_rank(sharded):
    w = oracle(reference=True)
    assert w.load(sharded / "ckpt") == STEPS                # 2 ranks' shards, resharded into one full copy
    assert_same(weights(w), dict(np.load(sharded / "ref.npz")), atol=0)
    run_steps(w, range(STEPS, STEPS + 1))                   # AdamW moments and schedule came back too
    assert_same(dict(np.load(sharded / "ref_after.npz")), weights(w))


def test_export_gathers_the_full_model(sharded):
    net = model.from_pretrained(sharded / "hf")
    want = dict(np.load(sharded / "ref.npz"))
    assert_same({n: t.numpy() for n, t in model.to_checkpoint_tensors(net.state_dict())}, want, atol=0)


def test_each_rank_holds_half(sharded):
    held = json.loads((sharded / "plain.json").read_text())["held"]
    full = sum(p.numel() * 4 for p in tiny_net().parameters())
    for h in held:                                          # fp32 params, fp32 grads, AdamW's two fp32 moments
        assert abs(h["params"] - full / 2) <= 0.05 * full / 2, h
        assert abs(h["grads"] - full / 2) <= 0.05 * full / 2, h
        assert abs(h["optimizer"] - full) <= 0.05 * full, h


def test_plan_matches_what_ranks_hold(sharded, tmp_path):
    from align.grpo.config import GRPOConfig
    from align.plan import make_plan

    tiny_net().save_pretrained(tmp_path / "net")
    cfg = GRPOConfig(init_from=str(tmp_path / "net"), data=[], rewards=[{"spec": "tests.grpo_fixture:brevity"}],
                     engine={"train": {"world_size": 2, "sharding": "fsdp2"}})
    rank = make_plan(cfg).rank
    for h in json.loads((sharded / "plain.json").read_text())["held"]:
        for k in ("params", "grads", "optimizer"):
            assert abs(rank[k] - h[k]) <= 0.05 * h[k], (k, rank[k], h[k])
