"""`align plan`: V2-Lite and V2 numbers against constants written by hand (from the papers' parameter
counts, not the plan's formulas), the fits verdict, and the CLI. The plan's per-rank bytes against what
sharded ranks actually hold: test_fsdp.py::test_plan_matches_what_ranks_hold."""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

from align.cli import app
from align.plan import make_plan
from align.recipe import load_recipe
from tests.test_recipes import REPO

GiB = 2**30


def plan_of(recipe: str, preset: str, **kw):
    return make_plan(load_recipe(REPO / "recipes" / recipe, [f"grpo.init_from={preset}"]).grpo, **kw)


def test_v2_lite_numbers_by_hand():
    p = plan_of("v2_lite_8gpu.yaml", "v2-lite")
    assert p.params == pytest.approx(15.71e9, rel=0.005)               # DeepSeek-V2-Lite: 15.7B
    rollout = p.phases[0]
    assert rollout.vllm_weights == pytest.approx(15.71e9 * 2, rel=0.005)  # bf16 vLLM weights on one GPU
    assert rollout.kv_cache == 16 * GiB                                 # the recipe's kv_cache_gib
    assert p.rank["params"] == pytest.approx(15.71e9 * 4 / 8, rel=0.005)  # fp32 master shard, 8 ranks
    assert p.rank["optimizer"] == pytest.approx(15.71e9 * 8 / 8, rel=0.005)
    assert p.host_per_rank == pytest.approx(15.71e9 * (4 + 4 + 8 + 4) / 8, rel=0.005)  # cpu_offload
    assert all(p.fits(ph) for ph in p.phases)


def test_v2_lite_without_offload_on_one_gpu_does_not_fit():
    p = plan_of("v2_lite_8gpu.yaml", "v2-lite", gpus=1)
    assert p.rank["params"] + p.rank["grads"] + p.rank["optimizer"] == pytest.approx(15.71e9 * 16, rel=0.005)
    r = load_recipe(REPO / "recipes" / "v2_lite_8gpu.yaml",
                    ["grpo.init_from=v2-lite", "grpo.engine.train.cpu_offload=false"]).grpo
    p = make_plan(r, gpus=1)
    train = p.phases[-1]
    assert train.weights >= 15.71e9 * 8 * 0.995 and not p.fits(train)   # fp32 params + reference: 126 GB


def test_v2_numbers_by_hand():
    p = plan_of("v2_128gpu.yaml", "v2")
    assert p.params == pytest.approx(236e9, rel=0.01)                  # DeepSeek-V2: 236B
    assert p.phases[0].vllm_weights == pytest.approx(236e9 * 2 / 8, rel=0.01)   # bf16, tensor parallel 8
    assert p.rank["params"] == pytest.approx(236e9 * 4 / 64, rel=0.01)  # HSDP: sharded over 64, 2 replicas
    assert all(p.fits(ph) for ph in p.phases)
    small = plan_of("v2_128gpu.yaml", "v2", gpu_memory_gib=10)
    assert not small.fits(small.phases[0])                               # 55 GiB of vLLM weights alone


def test_cli_prints_every_phase():
    result = CliRunner().invoke(app, ["plan", str(REPO / "recipes" / "v2_lite_8gpu.yaml"), "grpo.init_from=v2-lite",
                                      "--gpu-memory", "40"])
    assert result.exit_code == 0, result.output
    for phase in ("rollout", "reward", "reference", "train"):
        assert phase in result.output
    assert "NO" in result.output                                        # rollout: 29 GiB weights + 16 GiB KV > 40
    bad = CliRunner().invoke(app, ["plan", str(REPO / "recipes" / "v2_lite_8gpu.yaml")])
    assert bad.exit_code == 2 and "neither a model preset" in bad.output
