"""ChatModel on our rollout engine (vLLM or the native absorbed-MLA decoder), batched.

Conversations are rendered with the checkpoint's chat template and generated in one batch per
distinct temperature (MT-Bench mixes greedy and sampled categories).
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from align.eval.types import Conversation
from engine.sampling import SamplingConfig
from engine.vllm_mode import VLLMOptions


class EngineChatModel:
    """backend: auto = vLLM when importable, else our native decoder. vllm: how vLLM runs (engine.vllm_mode)."""

    def __init__(self, model_dir: str | Path, backend: Literal["auto", "vllm", "native"] = "auto", seed: int = 0,
                 vllm: VLLMOptions | None = None):
        from transformers import AutoTokenizer  # late: configs import this module, and `align validate` should be fast

        from engine.rollout_worker import build_backend, resolve_backend

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.seed = seed
        self.backend = resolve_backend(backend)
        vllm_options = (vllm or VLLMOptions()).constructor_kwargs()
        self.engine = build_backend(self.backend, model_dir, vllm_options if self.backend == "vllm" else None,
                                    **({"seed": seed} if self.backend == "vllm" else {"capture_routing": False}))

    def chat(self, conversations: list[Conversation], temperature: list[float] | float, max_tokens: int) -> list[str]:
        temps = temperature if isinstance(temperature, list) else [temperature] * len(conversations)
        ids = [self.tokenizer(self.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False),
                              add_special_tokens=False)["input_ids"] for c in conversations]
        replies = [""] * len(conversations)
        for t in sorted(set(temps)):
            idx = [i for i, x in enumerate(temps) if x == t]
            sampling = SamplingConfig(n=1, temperature=0.0 if t < 1e-4 else t, max_tokens=max_tokens, seed=self.seed)
            outs = self.engine.generate([ids[i] for i in idx], sampling)
            for out in outs:
                replies[idx[out.prompt_index]] = out.text
        return replies

    def close(self) -> None:
        self.engine.shutdown()
