"""N rollout engines on one local Ray: 2 native engines sample exactly what 1 samples (per-completion seeds; the
1-engine oracle is a local native engine loaded with the trainer's weights), and after 3 train + refit rounds
both serve the trainer's weights (greedy equal); a refit transfer that outlives its timeout and a dead engine
each end the call with one line naming the engine, or with restart_dead_engines the dead engine is replaced and
the call completes with the same completions. GRPO's sample_groups raw-scores the first engine's groups while
the other engine is still generating (a recording reward that releases the held engine). Checksums are on."""
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
import ray.cloudpickle

from align.grpo.config import GRPOConfig
from align.grpo.dynamic_sampling import sample_groups
from align.grpo.prompts import PromptStream, encode_prompts, reward_inputs
from engine.config import ClusterConfig, OptimConfig, RolloutConfig, TrainConfig
from engine.driver import EngineError, HybridEngine
from engine.rollout_native import NativeRollout
from engine.sampling import SamplingConfig
from rewards.combine import RewardSet
from tests.grpo_fixture import make_policy, rollout_batch

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


def reinforce(fwd, mb):
    return fwd.token_mean(-fwd.logp * mb["weight"][:, None]), {}


def _same(a, b) -> None:
    assert [(r.prompt_index, r.token_ids) for r in a] == [(r.prompt_index, r.token_ids) for r in b]
    np.testing.assert_allclose(np.concatenate([r.logprobs for r in a]), np.concatenate([r.logprobs for r in b]),
                               atol=1e-5)


def test_two_engines_sample_like_one_and_serve_the_trainers_weights_after_refits(ray_session, policy, tmp_path):
    """The 1-engine oracle is a local NativeRollout loaded with the trainer's weights before each round: the same
    backend on one engine, all prompts in one batch. Then a refit that outlives its timeout is one line."""
    flags = tmp_path / "flags"
    flags.mkdir()
    two = HybridEngine(ClusterConfig(**CLUSTER), RolloutConfig(num_engines=2, refit_checksum=True, refit_bucket_mb=0.05,
                                                               kwargs={"flag_dir": str(flags)}, refit_timeout_s=5),
                       OptimConfig(lr=2e-2), TrainConfig(), policy, tmp_path / "two",
                       rollout_backend=SlowNative)               # the native backend, slowed only by flag files
    local = NativeRollout(str(policy))
    try:
        greedy = SamplingConfig(n=1, temperature=0.0, max_tokens=8)
        initial = two.generate(PROMPTS, greedy)
        for rnd in range(3):
            sampling = SamplingConfig(n=3, temperature=1.0, max_tokens=8, seed=100 + rnd)
            b = two.generate(PROMPTS, sampling)                  # 3 prompts on each engine
            a = local.generate(PROMPTS, sampling)
            _same(a, b)                                          # per-completion seeds: spread-independent
            assert len({tuple(r.token_ids) for r in a}) > 3
            two.train_step(rollout_batch(a), reinforce)
            stats = two.sync_weights()
            assert stats.num_buckets > 1 and stats.bytes > 0
            local.load_weights(iter(ray.get(two.workers[0].hf_named_arrays.remote())))
        assert [ray.get(r.get_version.remote()) for r in two.rollouts] == [3, 3] == [two.policy_version] * 2
        want = local.generate(PROMPTS, greedy)                   # the trainer's weights after 3 updates
        _same(two.generate(PROMPTS, greedy), want)
        before = np.concatenate([r.logprobs for r in initial])
        assert np.abs(np.concatenate([r.logprobs for r in want]) - before).max() > 1e-3   # the weights moved

        (flags / "slow_load").touch()
        start = time.monotonic()
        with pytest.raises(EngineError) as err:
            two.sync_weights()
        assert time.monotonic() - start < 30
        msg = str(err.value)
        assert "\n" not in msg and "refit load timed out after 5s (rollout engine" in msg, msg
    finally:
        (flags / "slow_load").unlink(missing_ok=True)
        two.shutdown()


def test_dead_engine_is_a_one_line_error_naming_it(ray_session, policy, tmp_path):
    flags = tmp_path / "flags"
    flags.mkdir()
    eng = HybridEngine(ClusterConfig(**CLUSTER), RolloutConfig(num_engines=2, kwargs={"flag_dir": str(flags)}),
                       OptimConfig(), TrainConfig(), policy, tmp_path / "run", rollout_backend=SlowNative)
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


def test_dead_engine_is_restarted_and_the_call_completes_with_the_same_completions(ray_session, policy, tmp_path):
    """restart_dead_engines=1: engine 1 is killed mid-generate after one train + refit round; a new actor takes its
    bundle, gets the trainer's weights (version 1) and regenerates its share with the same seeds."""
    flags = tmp_path / "flags"
    flags.mkdir()
    eng = HybridEngine(ClusterConfig(**CLUSTER), RolloutConfig(num_engines=2, kwargs={"flag_dir": str(flags)},
                                                               refit_checksum=True),
                       OptimConfig(lr=2e-2), TrainConfig(), policy, tmp_path / "run", rollout_backend=SlowNative,
                       restart_dead_engines=1)
    local = NativeRollout(str(policy))
    sampling = SamplingConfig(n=2, temperature=1.0, max_tokens=6, seed=5)
    out: list = []

    def call():
        try:
            out.append(eng.generate(PROMPTS, sampling))
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            out.append(e)

    try:
        eng.train_step(rollout_batch(eng.generate(PROMPTS, sampling)), reinforce)
        eng.sync_weights()
        local.load_weights(iter(ray.get(eng.workers[0].hf_named_arrays.remote())))
        dead = eng.rollouts[1]
        (flags / "slow_generate").touch()
        t = threading.Thread(target=call)
        t.start()
        time.sleep(2.0)
        ray.kill(dead)
        (flags / "slow_generate").unlink()
        t.join(timeout=120)
        assert not t.is_alive() and len(out) == 1 and isinstance(out[0], list), out
        _same(local.generate(PROMPTS, sampling), out[0])     # the restarted engine serves version 1
        assert eng.rollouts[1] is not dead
        assert [ray.get(r.get_version.remote()) for r in eng.rollouts] == [1, 1]
    finally:
        (flags / "slow_generate").unlink(missing_ok=True)
        eng.shutdown()


class HeldNative(NativeRollout):
    """The first engine to generate runs at once; the other waits until `hold` is removed (or 60 s pass), then
    marks `slow_done` just before it returns."""

    def __init__(self, model_dir, flag_dir: str = "", **kw):
        super().__init__(model_dir, **kw)
        self.flag_dir = Path(flag_dir)

    def generate(self, prompt_token_ids, sampling, prompt_indices=None):
        try:
            os.close(os.open(self.flag_dir / "first", os.O_CREAT | os.O_EXCL))
            first = True
        except FileExistsError:
            first = False
        start = time.monotonic()
        while not first and (self.flag_dir / "hold").exists() and time.monotonic() - start < 60:
            time.sleep(0.05)
        out = super().generate(prompt_token_ids, sampling, prompt_indices)
        if not first:
            (self.flag_dir / "slow_done").touch()
        return out


GATE: dict = {"dir": None, "calls": []}


def gate_reward(prompts, completions, **columns) -> list[float]:
    """Records (samples, whether the held engine had finished) per call, then releases the held engine."""
    flags = Path(GATE["dir"])
    GATE["calls"].append((len(completions), (flags / "slow_done").exists()))
    (flags / "hold").unlink(missing_ok=True)
    return [len(c) / 10 for c in completions]


def test_groups_are_scored_while_the_other_engine_still_generates(ray_session, policy, tmp_path):
    from transformers import AutoTokenizer

    flags = tmp_path / "flags"
    flags.mkdir()
    GATE["dir"], GATE["calls"] = str(flags), []
    eng = HybridEngine(ClusterConfig(**CLUSTER), RolloutConfig(num_engines=2, kwargs={"flag_dir": str(flags)}),
                       OptimConfig(), TrainConfig(), policy, tmp_path / "run", rollout_backend=HeldNative)
    comps = [{"spec": f"{__name__}:gate_reward", "name": "gate", "normalize": "zscore-running"}]
    cfg = GRPOConfig(init_from=str(policy), data=[], rewards=comps, prompts_per_step=4, group_size=2,
                     dynamic_sampling=False, sampling={"temperature": 1.0, "max_tokens": 6})
    rows = [{"prompt": f"Count to {i + 2}:", "data_source": "p"} for i in range(8)]
    tokenizer = AutoTokenizer.from_pretrained(policy)
    try:
        (flags / "hold").touch()
        groups = sample_groups(eng, tokenizer, cfg, PromptStream(rows, 0), RewardSet(comps), seed=11)
        # the first call scored one engine's 2 groups while the held engine had not finished; the second, the rest
        assert GATE["calls"] == [(4, False), (4, True)], GATE["calls"]
        assert [r.prompt_index for r in groups.rollouts] == [0, 0, 1, 1, 2, 2, 3, 3]
        # the same as one batch call on the gathered rollouts (normaliser updated in prompt order)
        again = eng.generate(encode_prompts(tokenizer, groups.rows, cfg.system_prompt),
                             cfg.sampling.model_copy(update={"n": 2, "seed": 11}))
        assert [r.token_ids for r in again] == [r.token_ids for r in groups.rollouts]
        want = RewardSet(comps).score(*reward_inputs(groups.rows, again)[:2])
        assert groups.totals == want.total
    finally:
        eng.shutdown()
