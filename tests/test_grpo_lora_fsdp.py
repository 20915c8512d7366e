"""LoRA under train.sharding=fsdp2 on 2 gloo ranks against the 1-rank oracle (sharding=none, one process):
the adapters train to the same values (reference = adapters off on both), the merged and adapter-only refit
payloads match, and the sharded checkpoint (adapters and their AdamW state only: frozen base left out of DCP)
resumes at 1 rank to the same next step. Expert parallelism (ep_size=2) with adapters on attention only
(routed-expert adapters under EP are refused, see test_ep_with_expert_adapters_is_refused) equals its
1-rank oracle too. One torch.multiprocessing spawn; no Ray."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.config import LoraConfig, OptimConfig, TrainConfig
from engine.train import TrainWorker, even_slices, split_rows
from tests.fsdp_fixture import batch, kl_loss, one_thread, spawn, tiny_net

OPT = OptimConfig(lr=0.05, eps=1.0, max_grad_norm=1.0, micro_batch_size=2)
LORA = LoraConfig(r=2, alpha=4)          # attention and routed experts
ATTENTION_ONLY = LoraConfig(r=2, alpha=4, target_experts=[])
single_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


def steps(w: TrainWorker, which: range, rank: int = 0, world: int = 1) -> None:
    for s in which:
        shard = split_rows(batch(s), even_slices(5, world))[rank]
        shard["ref_logp"] = w.compute_logprobs(shard, "ref")
        w.train_step(shard, kl_loss)


def payloads(w: TrainWorker) -> dict[str, dict[str, np.ndarray]]:
    return {p: {n: a.copy() for b in w.weight_buckets(1 << 20, p) for n, a in b} for p in ("merged", "adapter")}


def ranks(rank: int, world: int, port: int, out: Path) -> None:
    w = TrainWorker(tiny_net, tiny_net, OPT, TrainConfig(sharding="fsdp2", world_size=world, lora=LORA,
                                                         reference=True), rank, world)
    w.init_distributed("127.0.0.1", port)
    steps(w, range(2), rank, world)
    got = payloads(w)
    w.save(out / "ckpt", [w.rng_state()] * world)
    ep = TrainWorker(tiny_net, tiny_net, OPT, TrainConfig(sharding="fsdp2", world_size=world, ep_size=world,
                                                          lora=ATTENTION_ONLY, reference=True), rank, world)
    ep.init_distributed("127.0.0.1", port)
    steps(ep, range(2), rank, world)
    got_ep = payloads(ep)
    if rank == 0:
        for p, arrays in got.items():
            np.savez(out / f"{p}.npz", **arrays)
        for p, arrays in got_ep.items():
            np.savez(out / f"ep_{p}.npz", **arrays)
    w.shutdown()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_fsdp")
    spawn(ranks, out)
    return out


def test_fsdp2_lora_equals_one_rank(sharded):
    w = TrainWorker(tiny_net, tiny_net, OPT, TrainConfig(lora=LORA, reference=True))
    steps(w, range(2))
    want = payloads(w)
    for p in ("merged", "adapter"):
        got = np.load(sharded / f"{p}.npz")
        assert sorted(got.files) == sorted(want[p])
        for k in want[p]:
            np.testing.assert_allclose(got[k], want[p][k], atol=1e-5, rtol=0, err_msg=f"{p} {k}")
    assert any(np.abs(a).max() > 0 for k, a in want["adapter"].items() if k.endswith(".lora_lhs"))


def test_ep_with_attention_adapters_equals_one_rank(sharded):
    w = TrainWorker(tiny_net, tiny_net, OPT, TrainConfig(lora=ATTENTION_ONLY, reference=True))
    steps(w, range(2))
    want = payloads(w)
    for p in ("merged", "adapter"):
        got = np.load(sharded / f"ep_{p}.npz")
        assert sorted(got.files) == sorted(want[p])
        for k in want[p]:
            np.testing.assert_allclose(got[k], want[p][k], atol=1e-5, rtol=0, err_msg=f"ep {p} {k}")


def test_ep_with_expert_adapters_is_refused():
    with pytest.raises(ValueError, match="target_experts"):
        TrainConfig(sharding="fsdp2", world_size=2, ep_size=2, lora=LORA)


def test_sharded_lora_checkpoint_resumes_at_one_rank(sharded):
    w = TrainWorker(tiny_net, tiny_net, OPT, TrainConfig(lora=LORA, reference=True))
    steps(w, range(3))                                  # oracle: 3 uninterrupted steps
    r = TrainWorker(tiny_net, tiny_net, OPT, TrainConfig(lora=LORA, reference=True))
    assert r.load(sharded / "ckpt") == 2                # adapters + AdamW state from the 2-rank DCP checkpoint
    steps(r, range(2, 3))
    want, got = payloads(w)["adapter"], payloads(r)["adapter"]
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=1e-5, rtol=0, err_msg=k)
    assert not (sharded / "ckpt" / "model.safetensors").exists()
