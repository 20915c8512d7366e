"""How vLLM runs (engine.vllm_mode): the choice is a pure function of device, AMX and options, so
both CPU kinds are tested here whatever this machine is; the options reach every place that starts vLLM."""
from __future__ import annotations

import pytest

from engine.vllm_mode import REFERENCE_CPU_BACKEND, VLLMOptions, choose_vllm_mode


@pytest.mark.parametrize("has_amx, dtype, backend", [
    (True, "bfloat16", None),                       # the AMX_MLA kernel, vLLM's own pick: bf16 only
    (False, "float32", REFERENCE_CPU_BACKEND),      # any other x86 CPU: the reference kernel in fp32
])
def test_auto_on_cpu(has_amx, dtype, backend):
    mode = choose_vllm_mode(on_gpu=False, has_amx=has_amx)
    assert (mode.dtype, mode.attention_backend) == (dtype, backend)


@pytest.mark.parametrize("has_amx", [True, False])
def test_exact_is_fp32_reference_kernel_on_either_cpu(has_amx):
    mode = choose_vllm_mode(on_gpu=False, has_amx=has_amx, precision="exact")
    assert (mode.dtype, mode.attention_backend) == ("float32", "CPU_MLA")


def test_gpu_defaults_to_bf16_and_vllms_backend():
    assert choose_vllm_mode(on_gpu=True, has_amx=False).dtype == "bfloat16"
    assert choose_vllm_mode(on_gpu=True, has_amx=True).attention_backend is None
    assert choose_vllm_mode(on_gpu=True, has_amx=False, precision="exact").dtype == "float32"


def test_fp32_asked_on_amx_gets_the_reference_kernel():
    """fp32 weights crash the AMX kernel (convert_weight_packed), so an fp32 request moves off it."""
    mode = choose_vllm_mode(on_gpu=False, has_amx=True, dtype="float32")
    assert (mode.dtype, mode.attention_backend) == ("float32", "CPU_MLA")


def test_explicit_backend_wins_and_impossible_combination_is_one_line():
    mode = choose_vllm_mode(on_gpu=False, has_amx=True, attention_backend="CPU_MLA")
    assert (mode.dtype, mode.attention_backend) == ("bfloat16", "CPU_MLA")
    with pytest.raises(ValueError, match="needs bf16/fp16 weights"):
        choose_vllm_mode(on_gpu=False, has_amx=True, dtype="float32", attention_backend="AMX_MLA")
    with pytest.raises(ValueError, match="precision"):
        choose_vllm_mode(on_gpu=False, has_amx=False, precision="fast")  # type: ignore[arg-type]


def test_options_are_typed_in_every_config_that_starts_vllm(tmp_path):
    from align.compare import CompareConfig
    from align.eval.run import EvalConfig
    from engine.config import RolloutConfig

    block = {"precision": "exact", "max_model_len": 256}
    assert RolloutConfig(vllm=block).vllm.constructor_kwargs() == block
    assert EvalConfig(judge={"kind": "openai", "base_url": "http://x", "model": "m"}, output_dir=tmp_path,
                      vllm=block).vllm.precision == "exact"
    assert CompareConfig(checkpoints={"a": "x"}, vllm=block).vllm.max_model_len == 256
    with pytest.raises(Exception, match="precision"):
        VLLMOptions(precision="fast")
    with pytest.raises(Exception, match="extra|unknown|not permitted"):
        VLLMOptions(dtpye="float32")


def test_recipe_key_reaches_the_rollout_config(tmp_path):
    from align.recipe import load_recipe
    from tests.conftest import REPO

    recipe = load_recipe(REPO / "recipes" / "grpo_reasoning.yaml",
                         ["grpo.engine.rollout.vllm.precision=exact", "grpo.engine.rollout.vllm.dtype=float32"])
    assert recipe.grpo.engine.rollout.vllm.constructor_kwargs() == {"precision": "exact", "dtype": "float32"}


def test_max_model_len_above_the_checkpoint_is_one_clear_error(tmp_path):
    """vLLM refuses max_model_len > max_position_embeddings: say so naming the file (the default is tested
    in test_vllm_auto.py, which starts vLLM on such a checkpoint)."""
    pytest.importorskip("vllm")
    import model
    from engine.rollout_vllm import VLLMRollout, _max_positions

    path = tmp_path / "m"
    model.build("tiny", seed=0, max_position_embeddings=512).save_pretrained(path)
    assert _max_positions(path) == 512
    with pytest.raises(ValueError, match=r"max_model_len 2048 exceeds .* 512 .*config.json"):
        VLLMRollout(path, precision="exact", max_model_len=2048)
