"""The `native` rollout backend: our absorbed-MLA decode (model/generate.py), batched.

Same interface and outputs as the vLLM backend. It is the fallback where vLLM is absent,
and it returns the routed experts of every token (per MoE layer) for routing replay.
Log-probs: logprobs_mode="processed_logprobs" (default) = of the distribution sampled from, after
temperature/top-k/top-p (what the trainer's importance correction compares against);
"raw_logprobs" = of the unmodified model, as vLLM's modes.
sampling.min_tokens: no stop token before that many completion tokens (vLLM's SamplingParams.min_tokens), for
runs that must sample fixed lengths.
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterable

import numpy as np
import torch

import model
from model.checkpoint import PER_EXPERT
from model.generate import sample

from .sampling import Rollout, SamplingConfig, compact_experts, completion_seed


def _truncate_at_stop(tokenizer, token_ids: list[int], stops: list[str]) -> tuple[list[int], str, bool]:
    """Cut a completion at the first stop string (the string itself is left out of the text, as vLLM does)."""
    for end in range(1, len(token_ids) + 1):
        text = tokenizer.decode(token_ids[:end], skip_special_tokens=True)
        hits = [text.find(s) for s in stops if s in text]
        if hits:
            return token_ids[:end], text[:min(hits)], True
    return token_ids, tokenizer.decode(token_ids, skip_special_tokens=True), False


class NativeRollout:
    def __init__(self, model_dir: str | os.PathLike | None = None, network=None, max_batch: int = 64,
                 device: str = "cpu", capture_routing: bool = True,
                 logprobs_mode: str = "processed_logprobs", dtype: str | None = None):
        if logprobs_mode not in ("processed_logprobs", "raw_logprobs"):
            raise ValueError(f"logprobs_mode must be processed_logprobs or raw_logprobs, got {logprobs_mode!r}")
        self.logprobs_mode = logprobs_mode.split("_")[0]
        if network is None:
            network = model.from_pretrained(model_dir, device=device)
        if dtype is not None:                                            # serve in another dtype (e.g. bfloat16)
            network = network.to(getattr(torch, dtype))
        self.network = network.eval()
        self.max_batch = max_batch
        self.capture_routing = capture_routing
        self.tokenizer = None
        if model_dir is not None and os.path.exists(os.path.join(model_dir, "tokenizer.json")):
            from transformers import AutoTokenizer
            self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.eos = network.config.eos_token_id

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingConfig,
                 prompt_indices: list[int] | None = None) -> list[Rollout]:
        """sampling.n completions per prompt. With sampling.seed set, completion j of the prompt whose global
        index is g (prompt_indices[i], default i) draws from its own stream completion_seed(seed, g, j), so
        the result does not depend on batching or on how prompts were spread over engines."""
        glob = list(range(len(prompt_token_ids))) if prompt_indices is None else list(prompt_indices)
        jobs = [(i, p, j) for i, p in enumerate(prompt_token_ids) for j in range(sampling.n)]
        stops = [self.eos] if isinstance(self.eos, int) else list(self.eos or [])
        stops += sampling.stop_token_ids
        rollouts: list[Rollout] = []
        for b in range(0, len(jobs), self.max_batch):
            chunk = jobs[b:b + self.max_batch]
            seed = None if sampling.seed is None else [completion_seed(sampling.seed, glob[i], j) for i, _, j in chunk]
            samples = sample(self.network, [p for _, p, _ in chunk], sampling.max_tokens, sampling.temperature,
                             sampling.top_k, sampling.top_p, stops, seed=seed, return_routing=self.capture_routing,
                             logprobs_mode=self.logprobs_mode,
                             min_new_tokens=sampling.min_tokens)
            for (i, prompt, _), s in zip(chunk, samples):
                tokens, logprobs, finish = s.token_ids, s.logprobs, s.finish_reason
                text = ""
                if self.tokenizer is not None:
                    tokens, text, hit = _truncate_at_stop(self.tokenizer, tokens, sampling.stop) if sampling.stop \
                        else (tokens, self.tokenizer.decode(tokens, skip_special_tokens=True), False)
                    if hit:
                        finish, logprobs = "stop", logprobs[:len(tokens)]
                routing = None
                if s.routed_experts is not None:
                    routing = compact_experts([r[:len(prompt) + len(tokens)].numpy() for r in s.routed_experts],
                                              self.network.config.n_routed_experts)
                rollouts.append(Rollout(i, list(prompt), tokens, logprobs if sampling.logprobs else None,
                                        text, finish, routing))
        return rollouts

    @torch.no_grad()
    def load_weights(self, named_arrays: Iterable[tuple[str, np.ndarray]]) -> float:
        """Refit from checkpoint-named arrays. Each per-expert matrix is copied into its slice of the fused
        3-D param, so a refit bucket may hold any subset of a layer's experts."""
        t0 = time.perf_counter()
        params = dict(self.network.named_parameters())
        params.update(self.network.named_buffers())
        for name, array in named_arrays:
            value = array if isinstance(array, torch.Tensor) else torch.from_numpy(np.asarray(array))
            m = PER_EXPERT.match(name)
            if m is None:
                target = params.get(name)
            else:
                prefix, e, kind = m.group(1), int(m.group(2)), m.group(3)
                fused = params.get(f"{prefix}.{'down_proj' if kind == 'down_proj' else 'gate_up_proj'}")
                if fused is None:
                    target = None
                elif kind == "down_proj":
                    target = fused[e]                                    # [H, I]
                else:
                    inter = fused.shape[1] // 2                          # gate_up [E, 2I, H]: gate rows, then up
                    target = fused[e, :inter] if kind == "gate_proj" else fused[e, inter:]
            if target is None:
                raise KeyError(f"refit sent a tensor the rollout model does not have: {name}")
            target.copy_(value)
        return time.perf_counter() - t0

    def load_adapter(self, named_arrays: Iterable[tuple[str, np.ndarray]]) -> None:
        """LoRA refit: W = W_base + L @ R per adapted tensor (engine/lora_sync.py), the base kept from the first."""
        from .lora_sync import AdapterApplier

        if getattr(self, "_adapters", None) is None:
            self._adapters = AdapterApplier(self.network)
        self._adapters.load(named_arrays)

    def sleep(self) -> None:  # nothing to free on the CPU path
        pass

    def wake(self, tags: list[str] | None = None) -> None:
        pass

    def shutdown(self) -> None:
        self.network = None
