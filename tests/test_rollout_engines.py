"""N rollout engines on one local Ray: 2 native engines sample exactly what 1 samples (per-completion seeds),
and after 3 train + refit rounds both serve the trainer's weights (greedy equal to a local copy loaded
with the trainer's weights: the oracle); a dead engine ends the call with one line naming it; a refit
transfer that outlives its timeout is one line too. Checksums are on."""
from __future__ import annotations

import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import ray.cloudpickle

from engine.config import ClusterConfig, OptimConfig, RolloutConfig, TrainConfig
from engine.driver import EngineError, HybridEngine
from engine.rollout_native import NativeRollout
from engine.sampling import SamplingConfig
from tests.grpo_fixture import make_policy

PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13], [14, 15, 16, 17, 18], [19, 20, 21], [22, 23]]
CLUSTER = dict(placement="split", rollout_num_cpus=1, train_num_cpus=1, actor_threads=1)


class SlowNative(NativeRollout):
    """The native backend, slowed down while a flag file exists (generate / load_weights)."""

    def __init__(self, model_dir, flag_dir: str = "", **kw):
        super().__init__(model_dir, **kw)
        self.flag_dir = Path(flag_dir)

    def _wait(self, what: str) -> None:
        while (self.flag_dir / what).exists():
            time.sleep(0.1)

    def generate(self, prompt_token_ids, sampling, prompt_indices=None):
        self._wait("slow_generate")
        return super().generate(prompt_token_ids, sampling, prompt_indices)

    def load_weights(self, named):
        self._wait("slow_load")
        return super().load_weights(named)


@pytest.fixture(scope="module")
def ray_session():
    temp = tempfile.mkdtemp(prefix="da-ray-", dir="/tmp")
    ray.init(address="local", num_cpus=6, _temp_dir=temp, include_dashboard=False,
             object_store_memory=100 * 2**20, _node_ip_address="127.0.0.2")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return make_policy(tmp_path_factory.mktemp("engines"), seed=2)


def _engine(policy, run: Path, num_engines: int, **rollout) -> HybridEngine:
    cfg = RolloutConfig(backend="native", num_engines=num_engines, refit_checksum=True, refit_bucket_mb=0.05,
                        **rollout)
    return HybridEngine(ClusterConfig(**CLUSTER), cfg, OptimConfig(lr=2e-2), TrainConfig(), policy, run)


def _batch(rollouts) -> dict[str, np.ndarray]:
    width = max(len(r.prompt_token_ids) + len(r.token_ids) for r in rollouts)
    ids = np.zeros((len(rollouts), width), dtype=np.int64)
    att, lm = np.zeros_like(ids), np.zeros_like(ids)
    for i, r in enumerate(rollouts):
        seq = r.prompt_token_ids + r.token_ids
        ids[i, :len(seq)], att[i, :len(seq)] = seq, 1
        lm[i, len(r.prompt_token_ids):len(seq)] = 1
    return {"input_ids": ids, "attention_mask": att, "loss_mask": lm,
            "weight": np.linspace(-1, 1, len(rollouts)).astype(np.float32)}


def reinforce(fwd, mb):
    return fwd.token_mean(-fwd.logp * mb["weight"][:, None]), {}


def _same(a, b) -> None:
    assert [(r.prompt_index, r.token_ids) for r in a] == [(r.prompt_index, r.token_ids) for r in b]
    np.testing.assert_allclose(np.concatenate([r.logprobs for r in a]), np.concatenate([r.logprobs for r in b]),
                               atol=1e-5)


def test_two_engines_sample_like_one_and_serve_the_trainers_weights_after_refits(ray_session, policy, tmp_path):
    one, two = _engine(policy, tmp_path / "one", 1), _engine(policy, tmp_path / "two", 2)
    try:
        greedy = SamplingConfig(n=1, temperature=0.0, max_tokens=8)
        initial = two.generate(PROMPTS, greedy)
        for rnd in range(3):
            sampling = SamplingConfig(n=3, temperature=1.0, max_tokens=8, seed=100 + rnd)
            a, b = one.generate(PROMPTS, sampling), two.generate(PROMPTS, sampling)
            _same(a, b)                                          # per-completion seeds: spread-independent
            assert len({tuple(r.token_ids) for r in a}) > 3
            batch = _batch(a)
            one.train_step(batch, reinforce)
            two.train_step(batch, reinforce)
            s1, s2 = one.sync_weights(), two.sync_weights()
            assert s1.num_buckets > 1 and s1.bytes == s2.bytes > 0
        assert [ray.get(r.get_version.remote()) for r in two.rollouts] == [3, 3] == [two.policy_version] * 2
        # the oracle: a local engine loaded with the trainer's weights
        local = NativeRollout(str(policy))
        local.load_weights(iter(ray.get(two.workers[0].hf_named_arrays.remote())))
        want = local.generate(PROMPTS, greedy)
        got = two.generate(PROMPTS, greedy)                      # 3 prompts on each engine
        _same(got, want)
        _same(one.generate(PROMPTS, greedy), want)
        before = np.concatenate([r.logprobs for r in initial])
        assert np.abs(np.concatenate([r.logprobs for r in want]) - before).max() > 1e-3   # the weights moved
    finally:
        one.shutdown()
        two.shutdown()


def test_dead_engine_and_refit_timeout_are_one_line_errors_naming_the_engine(ray_session, policy, tmp_path):
    flags = tmp_path / "flags"
    flags.mkdir()
    kwargs = {"flag_dir": str(flags)}
    eng = HybridEngine(ClusterConfig(**CLUSTER), RolloutConfig(num_engines=2, kwargs=kwargs, refit_timeout_s=3),
                       OptimConfig(), TrainConfig(), policy, tmp_path / "run", rollout_backend=SlowNative)
    try:
        (flags / "slow_load").touch()
        start = time.monotonic()
        with pytest.raises(EngineError) as err:
            eng.sync_weights()
        assert time.monotonic() - start < 30
        msg = str(err.value)
        assert "\n" not in msg and "refit load timed out after 3s (rollout engine" in msg, msg
    finally:
        (flags / "slow_load").unlink()
        eng.shutdown()

    eng = HybridEngine(ClusterConfig(**CLUSTER), RolloutConfig(num_engines=2, kwargs=kwargs), OptimConfig(),
                       TrainConfig(), policy, tmp_path / "run2", rollout_backend=SlowNative)
    errors: list[BaseException] = []

    def call():
        try:
            eng.generate(PROMPTS, SamplingConfig(max_tokens=2))
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            errors.append(e)

    try:
        (flags / "slow_generate").touch()
        t = threading.Thread(target=call)
        t.start()
        time.sleep(2.0)
        ray.kill(eng.rollouts[1])
        t.join(timeout=30)
        assert not t.is_alive() and len(errors) == 1 and isinstance(errors[0], EngineError)
        msg = str(errors[0])
        assert "\n" not in msg and "rollout actor died during generate (rollout engine 1," in msg, msg
    finally:
        (flags / "slow_generate").unlink()
        eng.shutdown()
