"""Absorbed-MLA decode (ours) vs transformers' DeepseekV2 decode (re-expands the latent every step).

Same weights, same prompts; for each context length: tokens/s of greedy decoding after a
prefill, cache bytes per token, and the ratio, measured side by side in one run.

    .venv/bin/python benchmarks/mla_decode.py [--contexts 256 1024 2048 4096] [--new 32] [--batch 4]
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch
from transformers import DeepseekV2ForCausalLM

import model

WIDE = dict(hidden_size=1024, num_attention_heads=16, num_key_value_heads=16, qk_nope_head_dim=128, v_head_dim=128,
            intermediate_size=2048, moe_intermediate_size=256, n_routed_experts=16, num_experts_per_tok=2,
            num_hidden_layers=4, max_position_embeddings=8192)


@torch.no_grad()
def ours_tokens_per_s(net, prompt: torch.Tensor, new: int) -> float:
    B, P = prompt.shape
    cache = net.new_cache(B, P + new)
    mask = torch.ones(B, P + new, dtype=torch.long)
    pos = torch.arange(P).expand(B, P)
    logits, _ = net.decode_step(prompt, pos, mask[:, :P], cache)
    t0 = time.perf_counter()
    for t in range(new):
        tok = logits.argmax(-1, keepdim=True)
        logits, _ = net.decode_step(tok, torch.full((B, 1), P + t), mask[:, :P + t + 1], cache)
    return B * new / (time.perf_counter() - t0)


@torch.no_grad()
def hf_tokens_per_s(ref, prompt: torch.Tensor, new: int) -> float:
    out = ref(input_ids=prompt, use_cache=True)
    past = out.past_key_values
    logits = out.logits[:, -1]
    t0 = time.perf_counter()
    for _ in range(new):
        tok = logits.argmax(-1, keepdim=True)
        out = ref(input_ids=tok, past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits[:, -1]
    return prompt.shape[0] * new / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 2048, 4096])
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--configs", nargs="+", default=["tiny", "wide"])
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    print(f"threads={torch.get_num_threads()} batch={args.batch} new_tokens={args.new}")
    print(f"{'config':6} {'context':>7} {'ours tok/s':>11} {'hf tok/s':>9} {'ratio':>6} {'ours B/tok':>10} {'hf B/tok':>9}")
    for name in args.configs:
        overrides = {"max_position_embeddings": 8192} if name == "tiny" else WIDE
        net = model.build("tiny", seed=0, **overrides).eval()
        with tempfile.TemporaryDirectory() as d:
            net.save_pretrained(d)
            ref = DeepseekV2ForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        cfg = net.config
        ours_bytes = model.LatentCache.bytes_per_token(cfg, torch.float32)
        # transformers caches the normalised latent and k_R per layer too, but expands K and V for
        # every head at every step: the working set per cached token is the per-head K and V.
        hf_bytes = cfg.num_hidden_layers * cfg.num_attention_heads * (
            cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim) * 4
        for ctx in args.contexts:
            prompt = torch.randint(3, cfg.vocab_size, (args.batch, ctx))
            ours = ours_tokens_per_s(net, prompt, args.new)
            hf = hf_tokens_per_s(ref, prompt, args.new)
            print(f"{name:6} {ctx:7d} {ours:11.1f} {hf:9.1f} {ours / hf:6.2f} {ours_bytes:10d} {hf_bytes:9d}", flush=True)


if __name__ == "__main__":
    main()
