"""Rollout/trainer mismatch: how far each sampler's log-probs are from the trainer's fp32 forward.

For the tiny and ~100M networks (random init, local tokenizer), each backend samples n completions of
16 counting prompts; the trainer (our network, fp32, logits / temperature, no routing replay since
vLLM-CPU returns no experts) scores the same tokens. Per token, d = t - b (t trainer, b sampler):

    mean |d|      k3 = mean exp(d) - d - 1  (KL(sampler || trainer) estimate)      max |d|

Backends: vLLM fp32 (exact, CPU_MLA kernel), vLLM bf16 (needs AMX tiles on a CPU, or a GPU), native fp32
(our absorbed-MLA decode) and native bf16; "native fp32 + replay" also replays the rollout's experts.
Each backend runs in its own subprocess (one vLLM engine per process).

    .venv/bin/python benchmarks/mismatch.py [--sizes tiny 100m] [--n 4] [--max-tokens 32] [--temperature 1.0]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import machine_line, make_checkpoint, table  # noqa: E402

BACKENDS = ["vllm-fp32", "vllm-bf16", "native-fp32", "native-bf16"]


def amx() -> bool:
    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except Exception:
        return False


def skip_reason(backend: str) -> str | None:
    if backend.startswith("vllm") and importlib.util.find_spec("vllm") is None:
        return "vLLM not installed"
    if backend == "vllm-bf16" and not (amx() or torch.cuda.is_available()):
        return "no AMX tiles (vLLM-CPU bf16 needs them)"
    return None


def prompts(tokenizer) -> list[list[int]]:
    texts = [f"Count to {k}:" if i % 2 else f"{i} plus {k} is" for i, k in enumerate(range(2, 18))]
    out = []
    for t in texts:
        chat = tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                             tokenize=False) if tokenizer.chat_template else t
        out.append(tokenizer(chat, add_special_tokens=False)["input_ids"])
    return out


def child(ckpt: Path, backend: str, a: argparse.Namespace) -> dict:
    """Sample with one backend, score with the fp32 trainer forward; per-token differences summarised."""
    from transformers import AutoTokenizer

    import model
    from align.grpo.batch import build_batch
    from engine.logprobs import token_logprobs
    from engine.sampling import SamplingConfig

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(ckpt)
    sampling = SamplingConfig(n=a.n, temperature=a.temperature, max_tokens=a.max_tokens, seed=0)
    if backend.startswith("vllm"):
        from engine.rollout_vllm import VLLMRollout

        opts = {"precision": "exact"} if backend == "vllm-fp32" else {"dtype": "bfloat16"}
        rollout = VLLMRollout(ckpt, max_model_len=256, kv_cache_gib=1, **opts)
    else:
        from engine.rollout_native import NativeRollout

        net = model.from_pretrained(ckpt)
        rollout = NativeRollout(network=net.to(torch.bfloat16) if backend == "native-bf16" else net)
        rollout.tokenizer = tok
    rollouts = [r for r in rollout.generate(prompts(tok), sampling) if r.token_ids]
    if hasattr(rollout, "shutdown"):
        rollout.shutdown()
    trainer = model.from_pretrained(ckpt).eval()
    batch = build_batch(rollouts, np.zeros(len(rollouts)), False, tok.pad_token_id or 0, replay=True)
    results = {}
    variants = [("", False)] + ([(" + replay", True)] if "routed_experts" in batch and backend == "native-fp32"
                                else [])
    for suffix, replay in variants:
        kwargs = {"routed_experts": torch.as_tensor(batch["routed_experts"])} if replay else {}
        with torch.no_grad():
            logits = trainer(torch.as_tensor(batch["input_ids"]), torch.as_tensor(batch["attention_mask"]),
                             **kwargs).logits[:, :-1]
        t = token_logprobs(logits / a.temperature, torch.as_tensor(batch["input_ids"])[:, 1:]).numpy()
        m = batch["loss_mask"][:, 1:].astype(bool)
        d = (t - batch["behavior_logp"])[m].astype(np.float64)
        results[backend + suffix] = {"tokens": int(m.sum()), "mean_abs": float(np.abs(d).mean()),
                                     "k3": float((np.exp(d) - d - 1).mean()), "max_abs": float(np.abs(d).max())}
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["tiny", "100m"])
    p.add_argument("--backends", nargs="+", default=BACKENDS)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--child", nargs=2, metavar=("CKPT", "BACKEND"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print("RESULT " + json.dumps(child(Path(a.child[0]), a.child[1], a)))
        return
    print(machine_line())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in a.sizes:
            ckpt = make_checkpoint(Path(tmp), size, with_tokenizer=True)
            for backend in a.backends:
                why = skip_reason(backend)
                if why:
                    rows.append([size, backend, "-", "-", "-", "-", f"skipped: {why}"])
                    continue
                cmd = [sys.executable, __file__, "--child", str(ckpt), backend, "--n", str(a.n),
                       "--max-tokens", str(a.max_tokens), "--temperature", str(a.temperature)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                if proc.returncode or not line:
                    tail = (proc.stderr.strip().splitlines() or ["?"])[-1][:80]
                    rows.append([size, backend, "-", "-", "-", "-", f"failed: {tail}"])
                    continue
                for name, r in json.loads(line[0][7:]).items():
                    rows.append([size, name, r["tokens"], r["mean_abs"], r["k3"], r["max_abs"], ""])
    print(f"n={a.n} per prompt, 16 prompts, max_tokens={a.max_tokens}, temperature={a.temperature}; "
          "trainer = our network in fp32")
    print(table(["size", "sampler", "tokens", "mean |dlogp|", "k3", "max |dlogp|", "note"], rows))


if __name__ == "__main__":
    main()
