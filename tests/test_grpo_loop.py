"""The GRPO step on an in-process engine (native rollout + one TrainWorker, no Ray): mismatch metrics on
the exact fp32 path, temperature in the trainer's forward, mu > 1 with token dropping, dynamic sampling
with refill, the reference routing on its own, samples.jsonl and the reward failure check."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

import model
from align.data.loading import DataSource
from align.grpo.batch import build_batch
from align.grpo.config import GRPOConfig
from align.grpo.loop import grpo_step
from align.grpo.metrics import SamplesLog
from align.grpo.prompts import PromptStream, load_prompt_rows
from engine.config import EngineConfig, OptimConfig, TrainConfig
from engine.sampling import SamplingConfig
from rewards.combine import RewardComponent, RewardSet
from tests.grpo_fixture import InProcessEngine, make_policy, write_prompts


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    """The fixture policy with a sharpened LM head, so that temperature visibly changes log-probs."""
    root = tmp_path_factory.mktemp("policy")
    path = make_policy(root)
    net = model.from_pretrained(path)
    with torch.no_grad():
        net.lm_head.weight.mul_(40.0)
    net.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    return write_prompts(tmp_path_factory.mktemp("data") / "prompts.jsonl")


def config(policy, prompts, reward="tests.grpo_fixture:brevity", **kw) -> GRPOConfig:
    engine = kw.pop("engine", EngineConfig(optim=OptimConfig(lr=1e-2)))
    base = dict(init_from=str(policy), data=[DataSource(source=str(prompts))],
                rewards=[RewardComponent(spec=reward, name="r")], steps=1, prompts_per_step=2, group_size=4,
                beta=0.04, seed=0, sampling=SamplingConfig(temperature=1.0, max_tokens=8), engine=engine)
    return GRPOConfig(**{**base, **kw})


def run_steps(engine, cfg, n: int, out_dir=None) -> list[dict]:
    tokenizer = AutoTokenizer.from_pretrained(cfg.init_from)
    stream = PromptStream(load_prompt_rows(cfg.data), cfg.seed)
    rewards = RewardSet(cfg.rewards)
    samples = SamplesLog(out_dir, 0, cfg.log_samples) if out_dir is not None else None
    records = []
    for step in range(n):
        step_cfg = cfg.model_copy(update={"sampling": cfg.sampling.model_copy(update={"seed": 17 + step})})
        records.append(grpo_step(engine, tokenizer, step_cfg, stream, rewards, samples, step + 1))
    return records


def test_mismatch_metrics_on_the_exact_fp32_path_at_temperature(policy, prompts, one_torch_thread):
    """Native rollout and trainer in fp32 at temperature 0.6: the trainer scores tokens under the tempered
    distribution, so |Δlogp| <= 1e-4 and IS weights are 1 within 1e-3; without the division by the
    temperature the same tokens are off by far more (what the metrics would have shown before)."""
    cfg = config(policy, prompts, is_correction="tis", sampling=SamplingConfig(temperature=0.6, max_tokens=8))
    engine = InProcessEngine(policy, cfg)
    rollouts = engine.generate([[5, 6, 7], [8, 9]], SamplingConfig(n=4, temperature=0.6, max_tokens=8, seed=3))
    batch = build_batch(rollouts, np.zeros(8), False, 0, replay=True, temperature=0.6)
    m = batch["loss_mask"][:, 1:].astype(bool)
    tempered = engine.compute_logprobs(batch)
    raw = engine.compute_logprobs({k: v for k, v in batch.items() if k != "temperature"})
    assert np.abs(tempered - batch["behavior_logp"])[m].max() <= 1e-4
    assert np.abs(raw - batch["behavior_logp"])[m].mean() > 0.05

    rec = run_steps(engine, cfg, 1)[0]
    assert rec["mismatch/logp_abs_diff"] <= 1e-4 and rec["mismatch/k3"] <= 1e-8
    assert abs(rec["mismatch/is_weight_mean"] - 1) <= 1e-3 and rec["mismatch/corrected_share"] == 0.0


def test_logged_mismatch_equals_a_recomputation(policy, prompts, one_torch_thread):
    """Raw-log-prob rollout (vLLM's raw_logprobs mode) against the tempered trainer: a real mismatch, and the
    logged token means equal the test's own, however the batch is micro-batched."""
    cfg = config(policy, prompts, prompts_per_step=3, sampling=SamplingConfig(temperature=0.6, max_tokens=8),
                 engine=EngineConfig(optim=OptimConfig(lr=1e-9, micro_batch_size=5)))
    engine = InProcessEngine(policy, cfg, rollout_kwargs={"logprobs_mode": "raw_logprobs"})
    captured = {}
    train_step = engine.train_step

    def spy(batch, loss_fn):
        captured["batch"] = batch
        captured["t"] = engine.trainer.compute_logprobs(batch)     # before the update: π_old
        return train_step(batch, loss_fn)

    engine.train_step = spy
    rec = run_steps(engine, cfg, 1)[0]
    b, t = captured["batch"], captured["t"]
    m = b["loss_mask"][:, 1:].astype(bool)
    d = (t - b["behavior_logp"])[m]
    assert rec["mismatch/logp_abs_diff"] == pytest.approx(np.abs(d).mean(), rel=1e-4) and np.abs(d).mean() > 0.05
    assert rec["mismatch/k3"] == pytest.approx((np.exp(d) - d - 1).mean(), rel=1e-4)
    assert rec["mismatch/is_weight_mean"] == pytest.approx(np.exp(d).mean(), rel=1e-4)


def test_mu2_first_inner_step_ratio_is_exactly_one_with_token_dropping(policy, prompts, one_torch_thread):
    """capacity_factor 0.5 drops tokens in training; the log-prob pass runs 5 rows at a time, training 3:
    per-sequence capacity and training-mode log-probs make the first inner step's ratio 1."""
    engine_cfg = EngineConfig(optim=OptimConfig(lr=1e-2, micro_batch_size=3),
                              train=TrainConfig(logprob_micro_batch_size=5))
    cfg = config(policy, prompts, mu=2, capacity_factor=0.5, engine=engine_cfg)
    engine = InProcessEngine(policy, cfg)
    rec = run_steps(engine, cfg, 1)[0]
    assert rec["train/first/ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert rec["train/first/clip_frac"] == 0.0
    assert rec["train/last/ratio_mean"] != pytest.approx(1.0, abs=1e-4)         # the second step moved
    calls = {c[1]["which"]: c[1] for c in engine.calls if c[0] == "compute_logprobs"}
    assert calls["policy"]["mode"] == "train" and "routed_experts" in calls["policy"]["keys"]
    assert "routed_experts" not in calls["ref"]["keys"]                           # the reference routes itself


def test_per_sequence_capacity_ignores_batch_composition(policy, one_torch_thread):
    """Token dropping decided per sequence gives each row the same log-probs alone or in a batch;
    batch-level capacity (DeepSeek-V2's) does not, and eval mode (no dropping) differs from both."""
    net = model.from_pretrained(policy).train()
    ids = torch.randint(3, 100, (6, 14), generator=torch.Generator().manual_seed(0))
    attn = torch.ones_like(ids)
    attn[3:, 10:] = 0

    def logits(rows, per_sequence):
        net.set_token_dropping(0.5, per_sequence=per_sequence)
        with torch.no_grad():
            return net(ids[rows], attn[rows]).logits

    for per_sequence, same in [(True, True), (False, False)]:
        whole = logits(slice(0, 6), per_sequence)
        split = torch.cat([logits(slice(0, 2), per_sequence), logits(slice(2, 6), per_sequence)])
        valid = attn.bool()
        assert torch.allclose(whole[valid], split[valid], atol=1e-5) == same, per_sequence
    net.set_token_dropping(None)
    assert not torch.allclose(net(ids, attn).logits, whole, atol=1e-4)


def test_dynamic_sampling_refills_to_prompts_per_step(policy, prompts, tmp_path, one_torch_thread, monkeypatch):
    import rewards.combine

    seen = []
    monkeypatch.setattr(rewards.combine, "check_failure_share", lambda out, share: seen.append(share),
                        raising=False)
    # a small lr: the refill mechanics are under test, not learning (at lr 1e-2 the policy can learn to stop at
    # once within 2 steps, and then every group ties whatever is sampled)
    cfg = config(policy, prompts, reward="tests.grpo_fixture:tie_often", dynamic_sampling=True,
                 dynamic_sampling_max_rounds=6, beta=0.0, log_samples=2,
                 engine=EngineConfig(optim=OptimConfig(lr=1e-3)))
    engine = InProcessEngine(policy, cfg)
    records = run_steps(engine, cfg, 3, tmp_path)
    for rec in records:
        assert rec["groups/kept"] == 2 and rec["train/num_seqs"] == 8, rec
    assert max(r["dynamic/rounds"] for r in records) >= 2           # refilled at least once
    assert all(0 < r["dynamic/kept_share"] < 1 for r in records if r["dynamic/rounds"] > 1)
    assert seen and set(seen) == {0.5}                               # the failure check ran after scoring
    lines = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 1, 2, 2, 3, 3]
    assert {"prompt", "completion", "reward", "rewards"} <= set(lines[0]) and "r" in lines[0]["rewards"]


def test_an_all_tied_step_is_logged_and_skipped(policy, prompts, one_torch_thread):
    cfg = config(policy, prompts, reward="tests.grpo_fixture:constant", dynamic_sampling=True,
                 dynamic_sampling_max_rounds=2, beta=0.0)
    engine = InProcessEngine(policy, cfg)
    rec = run_steps(engine, cfg, 1)[0]
    assert rec["groups/all_tied"] == 1.0 and rec["groups/kept"] == 0 and rec["dynamic/rounds"] == 2
    assert not [c for c in engine.calls if c[0] == "train_step"] and "train/loss" not in rec


def test_routing_replay_ref_switch(policy, prompts, one_torch_thread):
    """routing_replay_ref: true also forces the rollout's experts into the reference model."""
    cfg = config(policy, prompts, routing_replay_ref=True)
    engine = InProcessEngine(policy, cfg)
    run_steps(engine, cfg, 1)
    (ref,) = [c[1] for c in engine.calls if c[0] == "compute_logprobs"]
    assert ref["which"] == "ref" and "routed_experts" in ref["keys"] and "temperature" in ref["keys"]


def test_a_reward_failing_on_most_samples_stops_the_step(policy, prompts, one_torch_thread):
    from rewards.errors import RewardError

    cfg = config(policy, prompts, rewards=[RewardComponent(spec="tests.grpo_fixture:fails_on_long", name="flaky",
                                                           on_error="fallback")])
    engine = InProcessEngine(policy, cfg)
    with pytest.raises(RewardError, match="flaky"):
        run_steps(engine, cfg, 1)
    assert not [c for c in engine.calls if c[0] == "train_step"]
