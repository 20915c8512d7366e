"""Batched sampling on the absorbed-MLA decode path (the `native` rollout backend and `generate()`).

Prompts are left-padded into one batch; every step feeds one token per row and appends
its (c_KV, k_R) to the latent cache. Log-probabilities are those of the distribution the token was
drawn from (after temperature, top-k and top-p: vLLM's "processed_logprobs"), or with
logprobs_mode="raw" those of the raw model distribution (vLLM's "raw_logprobs").
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Sample:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str                                  # "stop" | "length"
    routed_experts: list | None = field(default=None)   # per MoE layer: [prompt_len + len(token_ids), k]


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, then top-k, then nucleus filtering of logits [B, V]."""
    logits = logits / temperature
    if top_k and 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p      # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


@torch.no_grad()
def sample(network, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, stop_token_ids: list[int] | tuple = (), seed: int | list[int] | None = None,
           return_routing: bool = False, logprobs_mode: str = "processed", min_new_tokens: int = 0) -> list[Sample]:
    """seed: one int for the batch, or one seed per row (row i's draws then depend on nothing else in the batch).

    min_new_tokens: the stop tokens are masked out (-inf logits) until a row has that many tokens (vLLM's
    min_tokens, transformers' min_new_tokens); processed log-probs are those of the masked distribution.
    Per-row seeds: each row draws its uniforms for all steps up front from its own generator and samples by
    inverse CDF, one batched op per step instead of one multinomial call per row."""
    if logprobs_mode not in ("processed", "raw"):
        raise ValueError(f"logprobs_mode must be 'processed' or 'raw', got {logprobs_mode!r}")
    device = next(network.parameters()).device
    B, P = len(prompts), max(len(p) for p in prompts)
    S = P + max_new_tokens
    pad = network.config.pad_token_id or 0
    ids = torch.full((B, P), pad, dtype=torch.long, device=device)
    key_mask = torch.zeros(B, S, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):                     # left padding
        ids[i, P - len(p):] = torch.tensor(p, device=device)
        key_mask[i, P - len(p):P] = 1
    positions = (key_mask[:, :P].cumsum(-1) - 1).clamp(min=0)
    row_u = None
    if isinstance(seed, (list, tuple)):                 # one random stream per row: uniforms [B, max_new_tokens]
        row_u = torch.stack([torch.rand(max_new_tokens, generator=torch.Generator(device=device).manual_seed(int(s)),
                                        device=device) for s in seed]).clamp_(min=1e-12)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if isinstance(seed, int) else torch.seed() % (2**63))
    stop = torch.tensor(sorted(set(stop_token_ids)) or [-1], device=device)

    was_training = network.training
    network.eval()
    cache = network.new_cache(B, S)
    logits, routed = network.decode_step(ids, positions, key_mask[:, :P], cache)
    routing_steps = [routed]
    out_tokens = torch.full((B, max_new_tokens), pad, dtype=torch.long, device=device)
    out_logp = torch.zeros(B, max_new_tokens, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    lengths = torch.full((B,), max_new_tokens, device=device)
    stopped = torch.zeros(B, dtype=torch.bool, device=device)
    next_pos = positions[:, -1] + 1
    no_stop = bool(min_new_tokens) and bool(stop_token_ids)
    for t in range(max_new_tokens):
        raw = logits
        if no_stop and t < min_new_tokens:               # stop tokens not allowed yet
            logits = logits.index_fill(1, stop, float("-inf"))
        if temperature <= 1e-5:
            logp = logits.log_softmax(-1)
            tok = logits.argmax(-1)
        else:
            filtered = filter_logits(logits, temperature, top_k, top_p)
            processed = filtered.log_softmax(-1)
            logp = processed if logprobs_mode == "processed" else raw.log_softmax(-1)
            probs = processed.exp()
            if row_u is None:
                tok = torch.multinomial(probs, 1, generator=gen)[:, 0]
            else:                                       # inverse CDF: first token whose cumulative mass reaches u
                cum = probs.cumsum(-1)
                tok = (cum < row_u[:, t:t + 1]).sum(-1).clamp_(max=probs.shape[-1] - 1)
        tok = torch.where(done, torch.full_like(tok, pad), tok)
        out_tokens[:, t] = tok
        out_logp[:, t] = logp.gather(1, tok[:, None])[:, 0]
        hit = ~done & torch.isin(tok, stop)
        lengths = torch.where(hit, torch.full_like(lengths, t + 1), lengths)
        stopped |= hit
        done |= hit
        key_mask[:, P + t] = 1                          # the sampled token becomes context for the next step
        if (done.all() or t == max_new_tokens - 1) and not return_routing:
            break
        logits, routed = network.decode_step(tok[:, None], next_pos[:, None], key_mask[:, :P + t + 1], cache)
        routing_steps.append(routed)
        next_pos = next_pos + 1
        if done.all():
            break
    network.train(was_training)

    samples = []
    by_layer = None
    if return_routing:  # per layer [B, P + steps, k]: prompt positions then one per generated token
        by_layer = [torch.cat([step[layer] for step in routing_steps], dim=1).cpu()
                    for layer in range(len(routing_steps[0]))]
    tokens_l, logp_l, lengths_l, stopped_l = out_tokens.tolist(), out_logp.tolist(), lengths.tolist(), stopped.tolist()
    for i, p in enumerate(prompts):
        n = int(lengths_l[i])
        routing = None if by_layer is None else [layer[i, P - len(p): P + n] for layer in by_layer]
        samples.append(Sample(tokens_l[i][:n], logp_l[i][:n], "stop" if stopped_l[i] else "length", routing))
    return samples


def hf_style_generate(network, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      generation_config=None, **kwargs) -> torch.Tensor:
    """`model.generate(...)` for transformers/TRL callers: [B, P] (left-padded) -> [B, P + new]."""
    gc = generation_config
    get = lambda k, d: kwargs.get(k, getattr(gc, k, None) if gc is not None else None) or d  # noqa: E731
    max_new = get("max_new_tokens", 20)
    do_sample = kwargs.get("do_sample", getattr(gc, "do_sample", False) if gc is not None else False)
    eos = get("eos_token_id", network.config.eos_token_id)
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    prompts = [row[m.bool()].tolist() for row, m in zip(input_ids, mask)]
    samples = sample(network, prompts, max_new, temperature=get("temperature", 1.0) if do_sample else 0.0,
                     top_k=get("top_k", 0) if do_sample else 0, top_p=get("top_p", 1.0) if do_sample else 1.0,
                     stop_token_ids=eos)
    pad = get("pad_token_id", network.config.pad_token_id or 0)
    width = max(len(s.token_ids) for s in samples)
    new = torch.full((len(samples), width), pad, dtype=torch.long, device=input_ids.device)
    for i, s in enumerate(samples):
        new[i, :len(s.token_ids)] = torch.tensor(s.token_ids, dtype=torch.long)
    return torch.cat([input_ids, new], dim=1)
