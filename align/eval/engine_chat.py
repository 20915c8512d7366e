"""ChatModel on our rollout engine (vLLM or the native absorbed-MLA decoder), batched.

Conversations are rendered with the checkpoint's chat template and generated in one batch per
distinct temperature (MT-Bench mixes greedy and sampled categories).
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from transformers import AutoTokenizer

from align.eval.types import Conversation
from engine.sampling import SamplingConfig


class EngineChatModel:
    def __init__(self, model_dir: str | Path, backend: Literal["auto", "vllm", "native"] = "auto", seed: int = 0):
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.seed = seed
        if backend == "auto":
            try:
                import vllm  # noqa: F401
                backend = "vllm"
            except ImportError:
                backend = "native"
        if backend == "vllm":
            from engine.rollout_vllm import VLLMRollout
            self.engine = VLLMRollout(model_dir, seed=seed)
        else:
            from engine.rollout_native import NativeRollout
            self.engine = NativeRollout(model_dir, capture_routing=False)
        self.backend = backend

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
