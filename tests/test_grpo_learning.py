"""GRPO end to end on the hybrid engine (Ray, native rollout): it learns a verifiable toy task."""
from __future__ import annotations

import json

import numpy as np

from align.data.loading import DataSource
from align.grpo.config import GRPOConfig
from align.grpo.loop import run_grpo
from engine.config import ClusterConfig, EngineConfig, OptimConfig, RolloutConfig
from engine.sampling import SamplingConfig
from rewards.combine import RewardComponent
from tests.grpo_fixture import make_policy, write_prompts


def grpo_config(policy, prompts, steps, **kw) -> GRPOConfig:
    return GRPOConfig(
        init_from=str(policy), data=[DataSource(source=str(prompts))],
        rewards=[RewardComponent(spec="tests.grpo_fixture:brevity")],
        steps=steps, prompts_per_step=4, group_size=8, beta=0.04, seed=0,
        sampling=SamplingConfig(temperature=1.0, max_tokens=12),
        engine=EngineConfig(cluster=ClusterConfig(num_cpus=2, rollout_num_cpus=1, train_num_cpus=1),
                            rollout=RolloutConfig(backend="native"),
                            optim=OptimConfig(lr=1e-2, max_grad_norm=1.0)),
        **kw)


def test_grpo_raises_reward(tmp_path):
    """12 seeded steps: the mean reward of the last 3 steps beats the first 3 by >= 0.1 (absolute)."""
    policy = make_policy(tmp_path)
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    summary = run_grpo(grpo_config(policy, prompts, steps=12), tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))
    rewards = [r["reward/total_mean"] for r in records]
    assert np.mean(rewards[-3:]) >= np.mean(rewards[:3]) + 0.1, rewards
    for key in ["train/kl", "train/clip_frac", "train/entropy", "adv/std", "groups/zero_variance_share",
                "completion/len_mean", "time/rollout", "time/reward", "time/train", "time/refit",
                "moe/max_over_mean_load"]:
        assert key in records[-1], key
    assert (tmp_path / "run" / "model" / "config.json").exists()
    assert summary["output_path"].endswith("model")
    # the exact fp32 path (native rollout, fp32 trainer): rollout and trainer agree on every step
    for r in records:
        assert r["mismatch/logp_abs_diff"] <= 1e-4 and abs(r["mismatch/is_weight_mean"] - 1) <= 1e-3, r["step"]
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == set(range(1, 13)) and "tests.grpo_fixture:brevity" in samples[0]["rewards"]


def test_reward_model_runs_in_its_own_actor(tmp_path):
    """A model reward is hosted by the engine (own actor, in the 'reward' offload phase) and scores
    exactly what the same model scores in-process; GRPO logs it as a component."""
    import functools

    from transformers import AutoTokenizer

    import model
    from align.grpo.reward_hosting import host_model_rewards
    from engine.driver import HybridEngine
    from rewards.model_reward import RewardModelScorer

    policy = make_policy(tmp_path)
    rm_dir = tmp_path / "rm"
    model.from_pretrained(policy, reward_model=True, num_labels=1).save_pretrained(rm_dir)
    AutoTokenizer.from_pretrained(policy).save_pretrained(rm_dir)
    cfg = grpo_config(policy, write_prompts(tmp_path / "p.jsonl"), steps=1)
    prompts, completions = ["Count to 3:", "Count to 5:"], ["0 1 2", "no"]
    with HybridEngine.from_config(cfg.engine, policy, tmp_path / "run") as engine:
        comps = host_model_rewards(engine, [RewardComponent(spec="reward_model", name="helpful",
                                                            kwargs={"path": str(rm_dir)})])
        from rewards.combine import RewardSet
        out = RewardSet(comps).score(prompts, completions)
        assert "scorer:helpful" in engine.offload.phases["reward"]      # colocated: the scheduler manages it
        assert set(engine.scorers) == {"helpful"}
    want = functools.partial(RewardModelScorer, path=str(rm_dir))()(prompts, completions)
    assert np.allclose(out.raw["helpful"], want, atol=1e-5)
