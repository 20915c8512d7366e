"""Weight sync without Ray: buckets in the served dtype (bf16 stays 2 bytes a weight), checksum catches a
corrupted bucket, per-completion seeds do not depend on batching, prompt spreading is balanced.
The oracle for the weights is the trainer's own parameters (cast to the served dtype)."""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from engine.config import OptimConfig, TrainConfig
from engine.rollout_worker import RolloutWorker
from engine.sampling import SamplingConfig, completion_seed, spread_prompts
from engine.train import TrainWorker
from engine.weight_sync import WeightSyncError, checksum, pack_buckets, unpack
from tests.grpo_fixture import make_policy, rollout_batch


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return make_policy(tmp_path_factory.mktemp("ws"), seed=1)


def _trainer(policy) -> TrainWorker:
    return TrainWorker(functools.partial(_load, str(policy)), optim=OptimConfig(lr=1e-2), train=TrainConfig())


def _load(path: str):
    import model

    return model.from_pretrained(path)


def _send(trainer: TrainWorker, dtype: str | None, bucket_bytes: int = 20_000, with_checksum: bool = True):
    """The object-store stream of a training rank, paired up as (meta, bytes) per bucket."""
    items = list(trainer.sync_send("object_store", bucket_bytes, dtype, with_checksum))
    return list(zip(items[0::2], items[1::2]))


def test_pack_unpack_round_trip_keeps_bf16_bits_and_size():
    torch.manual_seed(0)
    named = [("a", torch.randn(300, 7)), ("b", torch.randn(5).to(torch.bfloat16)), ("c", torch.randn(2, 3, 4))]
    bkts = list(pack_buckets(named, 4000, torch.bfloat16, with_checksum=True))
    assert len(bkts) > 1 and all(b.dtype == torch.uint8 for _, b in bkts)
    assert sum(m.nbytes for m, _ in bkts) == 2 * sum(t.numel() for _, t in named)        # 2 bytes per weight
    got = dict(kv for m, b in bkts for kv in unpack(m, b.numpy()))
    for name, t in named:
        assert got[name].dtype == torch.bfloat16
        assert torch.equal(got[name].view(torch.int16), t.to(torch.bfloat16).view(torch.int16)), name


def test_bf16_engine_receives_bf16_buckets_equal_to_the_trainers_weights(policy):
    trainer = _trainer(policy)
    engine = RolloutWorker("native", str(policy), dtype="bfloat16")
    assert engine.serve_dtype() == "bfloat16"
    trainer.train_step(*_one_batch(engine))                     # the trainer's weights move away from the file
    bkts = _send(trainer, engine.serve_dtype())
    n_params = sum(p.numel() for p in trainer.unwrapped.parameters())
    assert sum(m.nbytes for m, _ in bkts) == 2 * n_params       # never an fp32 up-cast on the wire
    assert all(e[1] == "bfloat16" for m, _ in bkts for e in m.entries)
    for meta, payload in bkts:
        engine.receive_bucket("object_store", meta, payload)
    engine.finish_refit(1)
    want = {n: torch.from_numpy(a).to(torch.bfloat16) for n, a in trainer.hf_named_arrays()}
    probe = RolloutWorker("native", str(policy), dtype="bfloat16")
    probe.impl.load_weights(iter(want.items()))
    for (n, p), (_, q) in zip(engine.impl.network.named_parameters(), probe.impl.network.named_parameters()):
        assert p.dtype == torch.bfloat16 and torch.equal(p, q), n


def _one_batch(engine: RolloutWorker):
    rollouts = engine.generate([[5, 6, 7], [8, 9]], SamplingConfig(n=2, max_tokens=4, seed=0))
    batch = rollout_batch(rollouts)

    def loss(fwd, mb):
        return fwd.token_mean(-fwd.logp * mb["weight"][:, None]), {}
    return batch, loss


def test_corrupted_bucket_is_detected_by_its_checksum(policy):
    trainer = _trainer(policy)
    engine = RolloutWorker("native", str(policy))
    bkts = _send(trainer, "float32")
    meta, payload = bkts[1]
    bad = payload.copy()
    bad[len(bad) // 2] ^= 0x10                                  # one flipped bit
    with pytest.raises(WeightSyncError, match=r"refit bucket 1 .*failed its checksum at rollout engine 0"):
        engine.receive_bucket("object_store", meta, bad)
    with pytest.raises(WeightSyncError, match="bytes, expected"):
        engine.receive_bucket("object_store", meta, payload[:-4])
    engine.receive_bucket("object_store", meta, payload)        # the intact bucket loads
    assert checksum(payload) == meta.checksum != checksum(bad)
    assert checksum(torch.from_numpy(payload)) == meta.checksum   # CPU tensors and numpy agree


def test_completion_seed_makes_native_sampling_independent_of_batching(policy):
    eng = RolloutWorker("native", str(policy), max_batch=64)
    small = RolloutWorker("native", str(policy), max_batch=2)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [7]]
    cfg = SamplingConfig(n=3, temperature=1.0, max_tokens=6, seed=11)
    whole = eng.generate(prompts, cfg)
    parts = small.generate([prompts[3], prompts[1]], cfg, prompt_indices=[3, 1]) + \
        small.generate([prompts[0], prompts[2]], cfg, prompt_indices=[0, 2])
    by_key = {(g, j): r for (g, j), r in zip([(3, j) for j in range(3)] + [(1, j) for j in range(3)] +
                                            [(0, j) for j in range(3)] + [(2, j) for j in range(3)], parts)}
    for i, r in enumerate(whole):
        other = by_key[(r.prompt_index, i % 3)]
        assert r.token_ids == other.token_ids
        np.testing.assert_allclose(r.logprobs, other.logprobs, atol=1e-5)
    assert len({tuple(r.token_ids) for r in whole}) > 4          # the streams differ between completions
    assert completion_seed(11, 3, 1) == completion_seed(11, 3, 0) + 1 != completion_seed(12, 3, 1)


def test_spread_prompts_equal_counts_longest_first():
    costs = [10, 1, 9, 2, 8, 3, 7]
    parts = spread_prompts(costs, 3)
    assert sorted(i for p in parts for i in p) == list(range(7))
    assert sorted(len(p) for p in parts) == [2, 2, 3]
    assert [sorted(p) == p for p in parts] == [True] * 3
    assert sorted(next(k for k, p in enumerate(parts) if i in p) for i in (0, 2, 4)) == [0, 1, 2]  # 3 costliest apart
    loads = sorted(sum(costs[i] for i in p) for p in parts)
    assert loads[-1] - loads[0] <= 3                             # LPT under a count cap: balanced
    assert [len(p) for p in spread_prompts([1.0] * 5, 2)] == [3, 2]
