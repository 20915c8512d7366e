"""Rollout throughput: vLLM (CPU) vs our native absorbed-MLA sampler vs transformers' `generate`.

Same checkpoint, same prompts, same n / prompt length / completion length, sampled at temperature 1;
the backends take turns within each repeat so a change in machine load hits all of them alike.
tokens/s = generated tokens (prompt excluded, prefill time included) / wall time of the call.

    .venv/bin/python benchmarks/rollout.py [--sizes tiny 100m] [--prompts 8] [--n 4] [--prompt-len 32]
                                           [--max-tokens 32] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from transformers import DeepseekV2ForCausalLM

os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # vLLM's start-up chatter would bury the table

from _common import machine_line, make_checkpoint, median, param_summary, table
from engine.rollout_native import NativeRollout
from engine.sampling import SamplingConfig

BACKENDS = ("vllm", "native", "hf")
PAIRS = (("vllm", "hf"), ("native", "hf"), ("vllm", "native"))


class HFGenerate:
    """transformers' DeepseekV2ForCausalLM.generate behind the rollout interface (tokens only)."""

    def __init__(self, path: Path):
        self.net = DeepseekV2ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.eos, self.pad = self.net.config.eos_token_id, self.net.config.pad_token_id

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[list[int]]:
        ids = torch.tensor(prompts)                       # equal lengths: no padding needed
        out = self.net.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                temperature=sampling.temperature, top_k=0, top_p=1.0,
                                max_new_tokens=sampling.max_tokens, num_return_sequences=sampling.n,
                                eos_token_id=self.eos, pad_token_id=self.pad)
        rows = []
        for row in out[:, ids.shape[1]:].tolist():      # cut at the first EOS (kept, as the others count it)
            rows.append(row[:row.index(self.eos) + 1] if self.eos in row else row)
        return rows


def generated_tokens(backend: str, impl, prompts: list[list[int]], sampling: SamplingConfig) -> int:
    if backend == "hf":
        return sum(len(r) for r in impl.generate(prompts, sampling))
    return sum(len(r.token_ids) for r in impl.generate(prompts, sampling))


def build(backend: str, path: Path, max_len: int):
    if backend == "vllm":
        from engine.rollout_vllm import VLLMRollout
        return VLLMRollout(path, precision="exact", seed=0, max_model_len=max_len, kv_cache_gib=1)
    if backend == "native":
        return NativeRollout(path, capture_routing=False)
    return HFGenerate(path)


def bench_size(size: str, args: argparse.Namespace, root: Path) -> list[list]:
    path = make_checkpoint(root, size, seed=0)
    print(f"\n[{size}] {param_summary(path)}", flush=True)
    vocab = DeepseekV2ForCausalLM.config_class.from_pretrained(path).vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, vocab, (args.prompts, args.prompt_len), generator=g).tolist()
    sampling = SamplingConfig(n=args.n, temperature=1.0, max_tokens=args.max_tokens)
    impls = {}
    for b in args.backends:
        t0 = time.perf_counter()
        impls[b] = build(b, path, args.prompt_len + args.max_tokens + 8)
        generated_tokens(b, impls[b], prompts, sampling.model_copy(update={"max_tokens": 2}))  # warm-up, full batch
        print(f"  {b}: ready in {time.perf_counter() - t0:.1f} s (threads {torch.get_num_threads()})", flush=True)
    rates: dict[str, list[float]] = {b: [] for b in args.backends}
    cpu_rates: dict[str, list[float]] = {b: [] for b in args.backends}
    for rep in range(args.repeats):
        for b in args.backends:
            t0, c0 = time.perf_counter(), time.process_time()
            tokens = generated_tokens(b, impls[b], prompts, sampling)
            rates[b].append(tokens / (time.perf_counter() - t0))
            cpu_rates[b].append(tokens / (time.process_time() - c0))
        print(f"  repeat {rep + 1}: " + "  ".join(f"{b} {rates[b][-1]:.0f} tok/s ({cpu_rates[b][-1]:.0f}/CPU-s)"
                                                for b in args.backends), flush=True)
    if "vllm" in impls:
        impls["vllm"].shutdown()
    rows = []
    # best = the repeat least disturbed by other jobs on the machine; per CPU-s = tokens per second of this
    # process's CPU time (all its threads), which other jobs disturb far less than wall time.
    for stat, fn, rs in (("median", median, rates), ("best", max, rates), ("per CPU-s", median, cpu_rates)):
        agg = {b: fn(r) for b, r in rs.items()}
        row = [size, stat, args.prompts, args.n, args.prompt_len, args.max_tokens] + [agg[b] for b in args.backends]
        rows.append(row + [agg[a] / agg[b] for a, b in PAIRS if a in agg and b in agg])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["tiny", "100m"])
    ap.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=4, help="samples per prompt")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(machine_line(), flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for size in args.sizes:
            rows += bench_size(size, args, Path(d))
    headers = ["size", "stat", "prompts", "n", "prompt", "new"] + [f"{b} tok/s" for b in args.backends]
    pairs = [f"{a}/{b}" for a, b in PAIRS if a in args.backends and b in args.backends]
    print(f"\n{args.repeats} repeats\n" + table(headers + pairs, rows))
    print(machine_line())


if __name__ == "__main__":
    main()
