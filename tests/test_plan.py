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
    engine = p.phases[-1]                                               # split: the engines' own GPUs
    assert engine.name.startswith("engine GPU")
    assert engine.vllm_weights == pytest.approx(236e9 * 2 / 8, rel=0.01)   # bf16, tensor parallel 8
    assert engine.kv_cache == 12 * 2**30
    assert p.phases[0].vllm_weights == 0                                # training GPUs hold no engine
    assert p.rank["params"] == pytest.approx(236e9 * 4 / 96, rel=0.01)   # EP8 + fsdp2: every shard on one of 96
    assert all(p.fits(ph) for ph in p.phases)
    small = plan_of("v2_128gpu.yaml", "v2", gpu_memory_gib=50)
    assert not small.fits(small.phases[-1])                              # 55 GiB of vLLM weights alone


def test_cli_prints_every_phase():
    result = CliRunner().invoke(app, ["plan", str(REPO / "recipes" / "v2_lite_8gpu.yaml"), "grpo.init_from=v2-lite",
                                      "--gpu-memory", "40"])
    assert result.exit_code == 0, result.output
    for phase in ("rollout", "reward", "reference", "train"):
        assert phase in result.output
    assert "NO" in result.output                                        # rollout: 29 GiB weights + 16 GiB KV > 40
    bad = CliRunner().invoke(app, ["plan", str(REPO / "recipes" / "v2_lite_8gpu.yaml")])
    assert bad.exit_code == 2 and "neither a model preset" in bad.output


# routed-expert parameters of one MoE layer: E x 3 projections x hidden x moe_intermediate (the papers' configs)
V2_LITE_LAYER_EXPERTS = 64 * 3 * 2048 * 1408
V2_LAYER_EXPERTS = 160 * 3 * 5120 * 1536


@pytest.mark.parametrize("recipe,preset,experts", [("v2_lite_8gpu.yaml", "v2-lite", V2_LITE_LAYER_EXPERTS),
                                                   ("v2_128gpu.yaml", "v2", V2_LAYER_EXPERTS)])
def test_expert_parallelism_gathers_only_local_experts(recipe, preset, experts):
    ep8 = plan_of(recipe, preset)
    assert ep8.ep_size == 8
    ep1 = make_plan(load_recipe(REPO / "recipes" / recipe, [f"grpo.init_from={preset}", "grpo.engine.train.ep_size=1"]).grpo)
    # bf16, current + prefetched layer: 2 x 2 bytes per parameter; EP8 leaves out 7/8 of the experts
    assert ep1.gathered - ep8.gathered == pytest.approx(2 * 2 * experts * 7 / 8, rel=1e-6)
    assert ep1.rank == ep8.rank                                  # the shards stay 1/world_size either way


def test_packing_sets_the_micro_batch_tokens():
    packed = plan_of("v2_lite_8gpu.yaml", "v2-lite")
    assert packed.micro_batch_tokens == 8192
    rows = make_plan(load_recipe(REPO / "recipes" / "v2_lite_8gpu.yaml", [
        "grpo.init_from=v2-lite", "grpo.engine.train.micro_batch_tokens=null", "grpo.engine.optim.micro_batch_size=4"]).grpo)
    assert rows.micro_batch_tokens == 4 * (512 + 1024)           # 4 rows padded to prompt + max_tokens
    assert rows.phases[-1].activations < packed.phases[-1].activations


def test_bad_ep_size_is_one_line_error():
    r = CliRunner().invoke(app, ["plan", str(REPO / "recipes" / "v2_128gpu.yaml"), "grpo.init_from=v2",
                                 "grpo.engine.train.ep_size=48"])
    assert r.exit_code == 2 and "ep_size=48 does not divide the 160 routed experts" in r.output, r.output
    r = CliRunner().invoke(app, ["plan", str(REPO / "recipes" / "v2_lite_8gpu.yaml"), "grpo.init_from=v2-lite",
                                 "grpo.engine.train.ep_size=3"])
    assert r.exit_code == 2 and "ep_size=3 does not divide train.world_size=8" in r.output, r.output
    r = CliRunner().invoke(app, ["plan", str(REPO / "recipes" / "v2_lite_8gpu.yaml"), "grpo.init_from=v2-lite",
                                 "grpo.engine.optim.grad_accum=2"])
    assert r.exit_code == 2 and "at most one of train.micro_batch_tokens" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1
