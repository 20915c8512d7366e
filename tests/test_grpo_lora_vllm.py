"""LoRA and vLLM on the tiny preset: the merged export (adapter in export/adapter beside it) loads in vLLM
unchanged and its greedy generations equal the trainer's merged network token for token; a refit with the
merged changed blocks (what vLLM gets instead of adapters, engine/lora_sync.py) brings the same engine to the
trainer's next weights. One vLLM engine: loading one is the slow part on 2 cores."""
from __future__ import annotations

import functools

import pytest
import torch

import model
from engine.config import LoraConfig, OptimConfig, TrainConfig
from engine.rollout_native import NativeRollout
from engine.sampling import SamplingConfig
from engine.train import TrainWorker
from engine.train import lora
from tests.fsdp_fixture import batch, kl_loss

pytest.importorskip("vllm")
PROMPTS = [[1, 17, 99, 5, 300], [1, 42, 7], [1, 8, 8, 8, 8, 1000, 2000, 12]]
GREEDY = SamplingConfig(n=1, temperature=0.0, max_tokens=16, stop_token_ids=[])


def greedy(engine) -> list[list[int]]:
    return [r.token_ids for r in sorted(engine.generate(PROMPTS, GREEDY), key=lambda r: r.prompt_index)]


def trainers_merged(w: TrainWorker, base_dir) -> NativeRollout:
    net = model.from_pretrained(base_dir)
    net.load_state_dict(dict(lora.merged_state(w.unwrapped)))
    return NativeRollout(network=net)


def test_vllm_loads_the_merged_export_and_takes_merged_refits(tmp_path):
    from engine.rollout_vllm import VLLMRollout

    base = tmp_path / "base"
    net = model.build("tiny", seed=0)
    with torch.no_grad():                          # larger logits than the 0.02 init: greedy is not all ties
        net.lm_head.weight.mul_(20)
    net.save_pretrained(base)
    w = TrainWorker(functools.partial(model.from_pretrained, str(base)), None, OptimConfig(lr=0.05, eps=1.0),
                    TrainConfig(lora=LoraConfig(r=4, alpha=8)))
    before = greedy(NativeRollout(network=model.from_pretrained(base)))
    w.train_step(batch(0), kl_loss)
    w.export_hf(tmp_path / "export")
    assert (tmp_path / "export" / "adapter" / "adapter_model.safetensors").is_file()
    engine = VLLMRollout(tmp_path / "export", precision="exact", seed=0, max_model_len=256)
    try:
        first = greedy(engine)
        assert first == greedy(trainers_merged(w, base))
        w.train_step(batch(1), kl_loss)
        payload = [x for b in w.weight_buckets(1 << 22, "merged") for x in b]
        assert not any(n.startswith(("model.embed_tokens", "lm_head", "model.norm")) for n, _ in payload)
        engine.load_weights(payload)
        engine.finish_refit()
        second = greedy(engine)
        assert second == greedy(trainers_merged(w, base))
        assert before != first or first != second, "the adapters never changed a greedy token"
    finally:
        engine.shutdown()
