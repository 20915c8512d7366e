"""GRPO against a bf16 vLLM sampler (vLLM-CPU on an AMX CPU): the mismatch it measures and corrects.

Skipped without AMX tiles (vLLM-CPU's bf16 MLA kernel needs them; elsewhere vLLM runs fp32, which
test_vllm_rollout covers) or without vLLM. Returned routed experts need a GPU, so replay here is off;
its alignment is verified with a stand-in in test_routing_replay.py.
"""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from align.data.loading import DataSource
from align.grpo.config import GRPOConfig
from engine.config import ClusterConfig, EngineConfig, OptimConfig, RolloutConfig
from engine.sampling import SamplingConfig
from rewards.combine import RewardComponent
from tests.grpo_fixture import VLLM_CPU_MLA, InProcessEngine, make_policy, write_prompts


def _amx() -> bool:
    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except Exception:
        return False


pytestmark = [pytest.mark.skipif(not _amx(), reason="bf16 vLLM-CPU needs AMX tiles"),
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM not installed")]
VLLM_BF16 = {"dtype": "bfloat16", "max_model_len": 256, "kv_cache_gib": 1}


def test_logged_mismatch_agrees_with_an_fp32_recomputation(tmp_path, one_torch_thread):
    from transformers import AutoTokenizer

    from align.grpo.loop import grpo_step
    from align.grpo.prompts import PromptStream, load_prompt_rows
    from rewards.combine import RewardSet

    policy = make_policy(tmp_path, **VLLM_CPU_MLA)
    cfg = GRPOConfig(init_from=str(policy), data=[DataSource(source=str(write_prompts(tmp_path / "p.jsonl")))],
                     rewards=[RewardComponent(spec="tests.grpo_fixture:brevity")], prompts_per_step=4,
                     group_size=4, beta=0.0, routing_replay=False, is_correction="tis", seed=0,
                     sampling=SamplingConfig(temperature=0.8, max_tokens=12, seed=5),
                     engine=EngineConfig(optim=OptimConfig(lr=1e-9, micro_batch_size=3)))
    engine = InProcessEngine(policy, cfg, rollout_kwargs=VLLM_BF16, backend="vllm")
    seen = {}
    train_step = engine.train_step

    def spy(batch, loss_fn):
        seen["batch"], seen["t"] = batch, engine.trainer.compute_logprobs(batch)   # fp32 trainer = π_old
        return train_step(batch, loss_fn)

    engine.train_step = spy
    try:
        rec = grpo_step(engine, AutoTokenizer.from_pretrained(policy), cfg,
                        PromptStream(load_prompt_rows(cfg.data), 0), RewardSet(cfg.rewards))
    finally:
        engine.shutdown()
    b = seen["batch"]
    m = b["loss_mask"][:, 1:].astype(bool)
    d = (seen["t"] - b["behavior_logp"])[m]             # trainer (fp32, tempered) - vLLM bf16 (processed)
    want = {"mismatch/logp_abs_diff": np.abs(d).mean(), "mismatch/k3": (np.exp(d) - d - 1).mean(),
            "mismatch/is_weight_mean": np.minimum(np.exp(d), 2.0).mean()}
    print({k: (rec[k], float(v)) for k, v in want.items()})
    assert np.abs(d).mean() > 1e-4                       # bf16 is not exact: there is something to measure
    for k, v in want.items():
        assert rec[k] == pytest.approx(v, rel=0.10), k


def test_tis_run_against_bf16_vllm_raises_the_reward(tmp_path):
    from align.grpo.loop import run_grpo

    policy = make_policy(tmp_path, **VLLM_CPU_MLA)
    cfg = GRPOConfig(
        init_from=str(policy), data=[DataSource(source=str(write_prompts(tmp_path / "p.jsonl")))],
        rewards=[RewardComponent(spec="tests.grpo_fixture:brevity")], steps=12, prompts_per_step=4,
        group_size=8, beta=0.04, seed=0, is_correction="tis", routing_replay=False,
        sampling=SamplingConfig(temperature=1.0, max_tokens=12),
        engine=EngineConfig(cluster=ClusterConfig(num_cpus=2, rollout_num_cpus=1, train_num_cpus=1),
                            rollout=RolloutConfig(backend="vllm", kwargs=VLLM_BF16),
                            optim=OptimConfig(lr=1e-2, max_grad_norm=1.0)))
    run_grpo(cfg, tmp_path / "run")
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward/total_mean"] for r in records]
    print("rewards", rewards, "mismatch", [r["mismatch/logp_abs_diff"] for r in records])
    assert np.mean(rewards[-3:]) >= np.mean(rewards[:3]) + 0.1, rewards
    assert all(r["mismatch/logp_abs_diff"] > 0 for r in records)
