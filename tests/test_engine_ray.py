"""HybridEngine on one local Ray session: data parallel exactness, generate -> train -> refit, offload, failures.

The rollout backend is the HF-generate stand-in (tests/test_engine_standin.py); the policy is a tiny
transformers DeepseekV2ForCausalLM. One Ray session and one 2-rank engine serve the whole module.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_engine_standin import (HFGenerateRollout, random_batch, register_for_ray,  # noqa: E402
                                 save_tiny_checkpoint, tiny_policy, weighted_nll)

from engine.config import ClusterConfig, OffloadConfig, OptimConfig, RolloutConfig, TrainConfig  # noqa: E402
from engine.driver import EngineError, HybridEngine  # noqa: E402
from engine.offload import DEFAULT_PHASES, OffloadedError  # noqa: E402
from engine.refit import hf_named_tensors  # noqa: E402
from engine.sampling import SamplingConfig  # noqa: E402
from engine.train import TrainWorker  # noqa: E402

# eps=1 turns AdamW's first step into ~SGD (update ~ lr * g / (|g| + 1)), so a gradient that is off by a
# factor (wrong normaliser, double-counted rank) changes the update; with eps=1e-8 the first step is
# lr * sign(g) and would hide it.
OPTIM = OptimConfig(lr=0.5, eps=1.0, max_grad_norm=None, micro_batch_size=3)


@pytest.fixture(scope="module")
def ray_session():
    temp = tempfile.mkdtemp(prefix="da-ray-", dir="/tmp")       # short: Ray's unix socket path limit
    # 127.0.0.2: Ray rewrites 127.0.0.1 to the host's address; any other loopback address keeps traffic on lo.
    ray.init(address="local", num_cpus=4, _temp_dir=temp, include_dashboard=False,
             object_store_memory=100 * 2**20, _node_ip_address="127.0.0.2")
    register_for_ray()
    yield
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=1)   # != the policy init (seed 0)


@pytest.fixture(scope="module")
def engine(ray_session, ckpt, tmp_path_factory):
    eng = HybridEngine(ClusterConfig(placement="colocated", actor_threads=2), RolloutConfig(), OPTIM,
                       TrainConfig(dp_world_size=2, reference=True), ckpt, tmp_path_factory.mktemp("run"),
                       OffloadConfig(mode="real"), model_factory=tiny_policy, rollout_backend=HFGenerateRollout)
    yield eng
    eng.shutdown()


def _rank_weights(eng: HybridEngine, rank: int) -> dict[str, np.ndarray]:
    return dict(ray.get(eng.workers[rank].hf_named_arrays.remote()))


def test_two_ranks_match_one_rank_on_the_same_global_batch(engine, tmp_path):
    engine.save(tmp_path / "state")                             # whatever state the engine is in now
    local = TrainWorker(tiny_policy, optim=OPTIM.model_copy(update={"micro_batch_size": None}), train=TrainConfig())
    local.load(tmp_path / "state")
    batch = random_batch(np.random.default_rng(0), rows=8)
    got = engine.train_step(batch, weighted_nll)               # 2 ranks x 2 micro-batches of 2 rows
    want = local.train_step(batch, weighted_nll)               # 1 rank, 1 batch of 8 rows
    for key in ("loss", "seq_logp", "seq_entropy", "grad_norm", "num_tokens", "num_seqs"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=key)
    assert got["num_tokens"] == batch["loss_mask"][:, 1:].sum() and got["num_seqs"] == 8
    ref = {n: t.numpy() for n, t in hf_named_tensors(local.unwrapped)}
    for rank in (0, 1):
        weights = _rank_weights(engine, rank)
        assert weights.keys() == ref.keys()
        for name, w in weights.items():
            np.testing.assert_allclose(w, ref[name], atol=1e-6, rtol=0, err_msg=f"rank {rank} {name}")


def _batch_from(rollouts) -> dict[str, np.ndarray]:
    ids = np.array([r.prompt_token_ids + r.token_ids for r in rollouts])
    loss_mask = np.zeros_like(ids)
    loss_mask[:, len(rollouts[0].prompt_token_ids):] = 1
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": loss_mask,
            "weight": np.linspace(-1, 1, len(rollouts)).astype(np.float32)}


def _completion_logprobs(eng: HybridEngine, rollouts) -> np.ndarray:
    P = len(rollouts[0].prompt_token_ids)
    return eng.compute_logprobs(_batch_from(rollouts), "policy")[:, P - 1:]


def test_generate_train_sync_round_trip(engine):
    prompts = [[1, 5, 9, 11], [1, 7, 7, 3], [1, 4, 8, 200]]
    rollouts = engine.generate(prompts, SamplingConfig(n=2, max_tokens=6, seed=0))
    assert len(rollouts) == 6 and all(len(r.token_ids) == 6 for r in rollouts)
    # The policy really is offloaded while the rollout engine runs (real mode moves tensors).
    with pytest.raises(OffloadedError, match="offloaded"):
        ray.get(engine.workers[0].compute_logprobs.remote(_batch_from(rollouts)))

    batch = _batch_from(rollouts)
    sampled = np.array([r.logprobs for r in rollouts])
    before = _completion_logprobs(engine, rollouts)
    assert np.abs(before - sampled).max() > 1e-2               # rollout engine started from other weights

    engine.train_step(batch, weighted_nll)
    stats = engine.sync_weights(bucket_mb=0.05)
    n_names = len(list(hf_named_tensors(tiny_policy())))
    assert stats.num_tensors == n_names and stats.num_buckets > 1 and stats.bytes > 0
    assert engine.rollout_version == engine.policy_version

    # After the refit the rollout engine samples from exactly the trainer's policy.
    greedy = engine.generate(prompts, SamplingConfig(n=1, temperature=0.0, max_tokens=6))
    np.testing.assert_allclose(np.array([r.logprobs for r in greedy]), _completion_logprobs(engine, greedy),
                               atol=1e-4)


def test_reference_model_stays_frozen_and_phases_hold_only_what_they_declare(engine):
    batch = random_batch(np.random.default_rng(1), rows=4)
    ref0 = engine.compute_logprobs(batch, "ref")
    engine.train_step(batch, weighted_nll)
    np.testing.assert_array_equal(engine.compute_logprobs(batch, "ref"), ref0)
    torch.manual_seed(0)
    fresh = TrainWorker(tiny_policy, train=TrainConfig())       # the reference is the initial policy
    np.testing.assert_allclose(ref0, fresh.compute_logprobs(batch), atol=1e-5)
    assert np.abs(engine.compute_logprobs(batch, "policy") - ref0).max() > 1e-3

    registered = {"policy", "optimizer", "ref", "rollout_weights", "rollout_kv"}
    assert set(engine.offload.items) == registered
    seen = set()
    for plan in engine.offload.history:
        assert set(plan.resident) == DEFAULT_PHASES[plan.phase] & registered, plan
        seen.add(plan.phase)
    assert {"rollout", "train", "policy", "reference", "refit"} <= seen
    sizes = ray.get(engine.workers[0].offload_sizes.remote())
    params = list(tiny_policy().parameters())
    param_bytes = sum(p.numel() * 4 for p in params)
    # AdamW: two float32 moments per parameter plus one float32 step counter per parameter tensor.
    assert sizes["optimizer"] == 2 * param_bytes + 4 * len(params)
    # per GPU: GPU 0 holds rank 0's copy only (rank 1's GPU has no engine, so rank 1 never offloads)
    assert list(engine.offloads) == [0]
    assert engine.offload.items["policy"].size() == sizes["policy"] >= param_bytes


def test_killed_rollout_actor_gives_one_line_engine_error(ray_session, ckpt, tmp_path):
    eng = HybridEngine(ClusterConfig(placement="colocated"), RolloutConfig(kwargs={"delay_s": 30.0}), OPTIM,
                       TrainConfig(), ckpt, tmp_path / "run", OffloadConfig(mode="accounting"),
                       model_factory=tiny_policy, rollout_backend=HFGenerateRollout)
    pids = [eng.rollout_info["pid"]] + [i["pid"] for i in eng.worker_info]
    errors: list[BaseException] = []

    def call():
        try:
            eng.generate([[1, 2, 3]], SamplingConfig(max_tokens=2))
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            errors.append(e)

    t = threading.Thread(target=call)
    start = time.monotonic()
    t.start()
    time.sleep(2.0)                                             # generate is now sleeping inside the actor
    ray.kill(eng.rollout)
    t.join(timeout=30)
    assert not t.is_alive() and time.monotonic() - start < 30
    assert len(errors) == 1 and isinstance(errors[0], EngineError)
    msg = str(errors[0])
    assert "\n" not in msg and "rollout actor died during generate (rollout engine 0" in msg
    with pytest.raises(EngineError, match="unusable"):
        eng.generate([[1, 2, 3]], SamplingConfig(max_tokens=2))
    eng.shutdown()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids), "actor processes left behind"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:                    # a zombie is gone for our purposes
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_backend_that_fails_to_start_gives_its_reason(ray_session, ckpt, tmp_path):
    def live_groups() -> set[str]:
        return {k for k, pg in ray.util.placement_group_table().items() if pg["state"] != "REMOVED"}

    before = live_groups()
    with pytest.raises(EngineError, match=r"rollout actor failed to start \(rollout engine 0\): TypeError: .*no_such_option"):
        HybridEngine(ClusterConfig(placement="split"), RolloutConfig(kwargs={"no_such_option": 1}), OPTIM,
                     TrainConfig(), ckpt, tmp_path / "run", model_factory=tiny_policy,
                     rollout_backend=HFGenerateRollout)
    assert live_groups() == before                              # its placement group was released


def test_actors_get_the_configured_thread_count(engine):
    """Colocated actors take turns, so each phase may use every core (Ray alone would give each 1 thread)."""
    for actor in (engine.workers[0], engine.workers[1], engine.rollout):
        assert ray.get(actor.__ray_call__.remote(lambda self: __import__("torch").get_num_threads())) == 2
