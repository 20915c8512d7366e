"""vLLM rollout backend: sample completions (token ids + log-probs) and take new weights in place.

One in-process vllm.LLM per rollout worker. On a machine without CUDA the CPU workarounds that
vLLM 0.32's CPU backend needs for DeepSeek MLA/MoE are applied here so callers never see them:
  * native rotary embedding (the CPU rope kernel mishandles DeepSeek's 3-D q/k: log-probs off by ~0.2),
  * prefix caching off and no sleep mode (neither works on CPU),
  * an explicit KV-cache size and eager mode (skips a ~60 s torch.compile warm-up on 2 cores),
  * the engine kept in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so refit arrays are
    handed to the worker by reference.
vLLM's CPU MLA kernel only supports kv_lora_rank=512 and qk_rope_head_dim=64.

Routed experts (for replaying the sampler's MoE routing in the trainer): vLLM 0.32 can return
them (`enable_return_routed_experts=True`, CompletionOutput.routed_experts, shape
[prompt+completion tokens, num_hidden_layers, top_k]) but only with Model Runner V2 (needs Triton, so
CUDA) and prefix caching. Neither exists on CPU, so `return_routed_experts=True` raises there and
Rollout.routed_experts stays None; on GPU it is passed through, split per layer.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from engine.refit import NamedArray, RefitStats, buckets
from engine.sampling import Rollout, SamplingConfig, prompt_seed
from engine.vllm_mode import Dtype, Precision, choose_vllm_mode, cpu_has_amx, log_mode_once

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
DEFAULT_BUCKET_BYTES = 256 << 20


def _eos_token_ids(model_dir: Path) -> list[int]:
    """EOS ids from generation_config.json (else config.json): vLLM only learns EOS from a tokenizer."""
    for fname in ("generation_config.json", "config.json"):
        path = model_dir / fname
        if path.exists():
            eos = json.loads(path.read_text()).get("eos_token_id")
            if eos is not None:
                return [eos] if isinstance(eos, int) else list(eos)
    return []


def _nbytes(t) -> int:
    return int(t.nbytes) if isinstance(t, np.ndarray) else t.numel() * t.element_size()


def _max_positions(model_dir: Path) -> int | None:
    path = model_dir / "config.json"
    try:
        value = json.loads(path.read_text()).get("max_position_embeddings")
    except (OSError, ValueError):
        return None
    return int(value) if isinstance(value, int) and value > 0 else None


class VLLMRollout:
    """Sampling + in-place weight refit on top of vllm.LLM."""

    def __init__(
        self,
        model_dir: str | os.PathLike,
        precision: Precision = "auto",
        dtype: Dtype | None = None,
        attention_backend: str | None = None,
        seed: int = 0,
        max_model_len: int | None = None,
        kv_cache_gib: float | None = None,
        gpu_memory_utilization: float = 0.5,
        enforce_eager: bool | None = None,
        return_routed_experts: bool = False,
        tensor_parallel_size: int = 1,
        enable_expert_parallel: bool = False,
        logprobs_mode: Literal["raw_logprobs", "processed_logprobs"] = "processed_logprobs",
    ) -> None:
        """precision / dtype / attention_backend: see engine.vllm_mode (auto = bf16 on AMX CPUs and
        GPUs, fp32 with the reference CPU_MLA kernel elsewhere; exact = fp32 CPU_MLA everywhere).
        max_model_len: None = the checkpoint's max_position_embeddings (vLLM refuses more).
        kv_cache_gib: KV-cache size (CPU default 1 GiB; on GPU it overrides gpu_memory_utilization).
        enforce_eager: None = eager on CPU, CUDA graphs on GPU.
        logprobs_mode: "processed_logprobs" (default) = log-probs under the distribution that sampled
        (after temperature; top-k/top-p renormalise over the kept tokens), which is what GRPO's
        importance correction needs; "raw_logprobs" = the unmodified model's.
        """
        self.model_dir = Path(model_dir)
        if not (self.model_dir / "config.json").is_file():
            raise FileNotFoundError(f"{self.model_dir}: not a Hugging Face model directory (no config.json)")
        self.on_cpu = not torch.cuda.is_available()
        self.has_tokenizer = any((self.model_dir / f).exists() for f in TOKENIZER_FILES)
        self.eos_token_ids = _eos_token_ids(self.model_dir)
        self.mode = choose_vllm_mode(on_gpu=not self.on_cpu, has_amx=self.on_cpu and cpu_has_amx(),
                                     precision=precision, dtype=dtype, attention_backend=attention_backend)
        log_mode_once(self.mode)
        limit = _max_positions(self.model_dir)
        if max_model_len is None:
            max_model_len = limit or 2048
        elif limit is not None and max_model_len > limit:
            raise ValueError(f"vllm.max_model_len {max_model_len} exceeds the checkpoint's max_position_embeddings "
                             f"{limit} ({self.model_dir / 'config.json'})")

        # Must be set before vLLM reads its environment (at import / engine creation).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        kwargs: dict = {}
        if self.on_cpu:
            if return_routed_experts:
                raise ValueError(
                    "return_routed_experts needs a CUDA GPU: vLLM 0.32 captures routed experts only with "
                    "Model Runner V2 (Triton) and prefix caching, neither available on CPU"
                )
            kv_cache_gib = 1.0 if kv_cache_gib is None else kv_cache_gib
            os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, math.ceil(kv_cache_gib)))
            kwargs.update(
                compilation_config={"custom_ops": ["-rotary_embedding"]},
                enable_prefix_caching=False,
                enforce_eager=True if enforce_eager is None else enforce_eager,
            )
        else:
            kwargs.update(
                gpu_memory_utilization=gpu_memory_utilization,
                enable_sleep_mode=True,
                enforce_eager=bool(enforce_eager),
            )
            if return_routed_experts:
                os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1"
                kwargs.update(enable_return_routed_experts=True, enable_prefix_caching=True)
        if self.mode.attention_backend is not None:
            kwargs["attention_config"] = {"backend": self.mode.attention_backend}
        if kv_cache_gib is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * (1 << 30))
        self.prefix_caching = kwargs.get("enable_prefix_caching", not self.on_cpu)
        if tensor_parallel_size > 1 or enable_expert_parallel:      # the placement gave this actor that many GPUs
            kwargs.update(tensor_parallel_size=tensor_parallel_size, enable_expert_parallel=enable_expert_parallel)

        from vllm import LLM  # late: after the environment above is in place

        # The in-process CPU worker replaces torch.set_num_threads with a no-op for the whole
        # process; remember it (and the thread count) so shutdown() can give them back.
        self._torch_threads = (torch.set_num_threads, torch.get_num_threads())
        t0 = time.perf_counter()
        self.llm = LLM(
            model=str(self.model_dir),
            dtype=self.mode.dtype,
            seed=seed,
            max_model_len=max_model_len,
            skip_tokenizer_init=not self.has_tokenizer,
            logprobs_mode=logprobs_mode,
            worker_extension_cls="engine.vllm_ext.RefitExtension",
            **kwargs,
        )
        self.startup_seconds = time.perf_counter() - t0
        self.refit_open = False
        self._prefix_stale = False
        log.info("vLLM ready in %.1f s (%s)", self.startup_seconds, "cpu" if self.on_cpu else "cuda")

    # ------------------------------------------------------------------ sampling
    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingConfig,
                 prompt_indices: list[int] | None = None) -> list[Rollout]:
        """sampling.n rollouts per prompt, grouped by prompt in input order.

        With sampling.seed set, the prompt whose global index is g (prompt_indices[i], default i) uses
        engine.sampling.prompt_seed(seed, g) and vLLM gives its j-th sample that + j (= completion_seed),
        so results do not depend on how prompts were spread over engines. Vary the seed between calls.
        """
        glob = list(range(len(prompt_token_ids))) if prompt_indices is None else list(prompt_indices)
        from vllm import SamplingParams

        self.finish_refit()
        if getattr(self, "_prefix_stale", False) and not self.reset_prefix_cache():
            raise RuntimeError("vLLM did not reset its prefix cache after a refit (requests still running?)")
        if sampling.stop and not self.has_tokenizer:
            raise ValueError(f"SamplingConfig.stop needs a tokenizer, and {self.model_dir} has none; use stop_token_ids")
        for i, p in enumerate(prompt_token_ids):
            if not p:
                raise ValueError(f"prompt {i} is empty")

        def params(i: int) -> SamplingParams:
            return SamplingParams(
                n=sampling.n,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k,
                max_tokens=sampling.max_tokens,
                min_tokens=sampling.min_tokens,
                stop=list(sampling.stop) or None,
                stop_token_ids=sorted(set(sampling.stop_token_ids) | set(self.eos_token_ids)),
                seed=None if sampling.seed is None else prompt_seed(sampling.seed, glob[i]),
                logprobs=0 if sampling.logprobs else None,
                detokenize=self.has_tokenizer,
            )

        prompts = [{"prompt_token_ids": list(p)} for p in prompt_token_ids]
        outputs = self.llm.generate(prompts, [params(i) for i in range(len(prompts))], use_tqdm=False)

        rollouts: list[Rollout] = []
        for i, out in enumerate(outputs):
            for c in sorted(out.outputs, key=lambda c: c.index):
                if c.finish_reason not in ("stop", "length"):
                    raise RuntimeError(f"vLLM finished prompt {i} with reason {c.finish_reason!r}")
                token_ids = list(c.token_ids)
                logprobs = None
                if sampling.logprobs:
                    logprobs = [float(np.float32(lp[t].logprob)) for t, lp in zip(token_ids, c.logprobs)]
                routed = None
                if c.routed_experts is not None:
                    routed = [np.ascontiguousarray(c.routed_experts[:, layer]) for layer in range(c.routed_experts.shape[1])]
                rollouts.append(
                    Rollout(
                        prompt_index=i,
                        prompt_token_ids=list(prompt_token_ids[i]),
                        token_ids=token_ids,
                        logprobs=logprobs,
                        text=c.text or "",
                        finish_reason=c.finish_reason,
                        routed_experts=routed,
                    )
                )
        return rollouts

    # ------------------------------------------------------------------ refit
    # A refit is staged: load_weights() may be called once per bucket (what the Ray rollout
    # worker does), and finish_refit() post-processes the layers once all their tensors are in.
    # generate() finishes a pending refit itself, so a lone load_weights() call is also safe.

    def load_weights(
        self,
        named: Iterable[tuple[str, torch.Tensor | np.ndarray]],
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    ) -> RefitStats:
        """Stage checkpoint-named tensors/arrays (see engine.refit) into the engine, bucket by bucket.

        Opens a refit if none is open. Returns what this call moved; call finish_refit() after the
        last call. A failure midway leaves the engine half-loaded: refit again or restart it.
        """
        t0 = time.perf_counter()
        if not self.refit_open:
            self.llm.collective_rpc("refit_begin")
            self.refit_open = True
        nbytes = ntensors = nbuckets = 0
        named = list(named)
        if all(isinstance(t, torch.Tensor) for _, t in named):
            # weight_sync buckets: already in the served dtype (bf16 stays bf16), one RPC per bucket
            groups = [named] if named else []
        else:
            groups = buckets(named, bucket_bytes)                  # legacy float32 numpy path
        for bucket in groups:
            self.llm.collective_rpc("refit_load", args=(bucket,))
            nbytes += sum(_nbytes(arr) for _, arr in bucket)
            ntensors += len(bucket)
            nbuckets += 1
        return RefitStats(seconds=time.perf_counter() - t0, bytes=nbytes, num_tensors=ntensors, num_buckets=nbuckets)

    def nccl_join(self, host: str, port: int, world_size: int, first_rank: int, timeout_s: float) -> None:
        """Every worker (TP rank w) joins the refit NCCL group as first_rank + w (engine/vllm_ext.py)."""
        self.llm.collective_rpc("refit_nccl_init", args=(host, port, world_size, first_rank, timeout_s))

    def receive_nccl(self, meta) -> int:
        """One NCCL-broadcast bucket, received, checked and loaded by every worker on its own GPU."""
        if not self.refit_open:
            self.llm.collective_rpc("refit_begin")
            self.refit_open = True
        self.llm.collective_rpc("refit_nccl_load", args=(meta,))
        return len(meta.entries)

    def finish_refit(self) -> None:
        """Post-process every layer completed by this refit; a no-op when no refit is open."""
        if not self.refit_open:
            return
        self.llm.collective_rpc("refit_finish")
        self.refit_open = False
        self._prefix_stale = True

    def reset_prefix_cache(self) -> bool:
        """Drop cached KV blocks (computed by the old weights); True when vLLM reports it did. The rollout
        worker calls it after a refit, once the KV cache is back (wake(["kv_cache"]))."""
        self._prefix_stale = False
        if not self.prefix_caching:
            return True
        return bool(self.llm.reset_prefix_cache())

    def serve_dtype(self) -> str:
        return str(self.mode.dtype).removeprefix("torch.")

    def load_weight_buckets(self, bucket_iter: Iterable[list[NamedArray]]) -> RefitStats:
        """One whole refit from already-bucketed float32 arrays: stage every bucket, then finish."""
        t0 = time.perf_counter()
        nbytes = ntensors = nbuckets = 0
        for bucket in bucket_iter:
            st = self.load_weights(bucket, bucket_bytes=max(1, sum(a.nbytes for _, a in bucket)))
            nbytes, ntensors, nbuckets = nbytes + st.bytes, ntensors + st.num_tensors, nbuckets + 1
        self.finish_refit()
        stats = RefitStats(seconds=time.perf_counter() - t0, bytes=nbytes, num_tensors=ntensors, num_buckets=nbuckets)
        log.info("%s", stats)
        return stats

    # ------------------------------------------------------------------ memory
    def sleep(self) -> None:
        """Free GPU memory while the trainer runs: level 1 = weights to host memory, KV cache dropped (level 2
        would also drop buffers that are no checkpoint tensor, e.g. rotary caches, which a refit cannot restore)."""
        if self.on_cpu:
            log.info("vLLM sleep mode is unavailable on CPU; sleep() is a no-op")
            return
        self.llm.sleep(level=1)

    def wake(self, tags: list[str] | None = None) -> None:
        """wake_up(tags): ["weights"] before a refit (the KV cache stays released, so weights + trainer fit),
        ["kv_cache"] after it; None = both."""
        if self.on_cpu:
            log.info("vLLM sleep mode is unavailable on CPU; wake() is a no-op")
            return
        self.llm.wake_up(tags=list(tags) if tags is not None else None)

    def shutdown(self) -> None:
        """Stop the engine and release its memory and process group (so another can start)."""
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        llm = self.__dict__.pop("llm", None)
        if llm is None:
            return
        engine_core = getattr(llm.llm_engine, "engine_core", None)
        if engine_core is not None:
            engine_core.shutdown()
        del llm
        cleanup_dist_env_and_memory()
        torch.set_num_threads, num_threads = self._torch_threads
        torch.set_num_threads(num_threads)
