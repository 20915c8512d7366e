"""model/generate.sample: min_new_tokens (no stop before the minimum) and per-row seeds sampled by inverse CDF
(draws independent of the batch, the distribution the model gives)."""
from __future__ import annotations

import torch

import model
from engine.rollout_native import NativeRollout
from engine.sampling import SamplingConfig
from model.generate import sample

PROMPTS = [[1, 17, 99, 5, 300], [1, 42, 7], [1, 8, 8, 8, 8, 1000, 2000, 12]]


def tiny():
    net = model.build("tiny", seed=0).eval()
    with torch.no_grad():                            # larger logits than the 0.02 init: not all ties
        net.lm_head.weight.mul_(20)
    return net


def test_min_new_tokens_blocks_stop_tokens_until_the_minimum():
    net = tiny()
    greedy = sample(net, PROMPTS, 6, temperature=0.0)
    stop = greedy[0].token_ids[0]                    # a token greedy decoding emits at once
    early = sample(net, PROMPTS, 6, temperature=0.0, stop_token_ids=[stop])
    assert len(early[0].token_ids) == 1 and early[0].finish_reason == "stop"
    forced = sample(net, PROMPTS, 6, temperature=0.0, stop_token_ids=[stop], min_new_tokens=6)
    assert all(len(s.token_ids) == 6 and s.finish_reason == "length" and stop not in s.token_ids for s in forced)
    sampled = sample(net, PROMPTS * 4, 12, temperature=1.0, stop_token_ids=[stop], min_new_tokens=12,
                     seed=[7 + i for i in range(12)])
    assert all(len(s.token_ids) == 12 and stop not in s.token_ids for s in sampled)
    assert all(lp <= 0.0 for s in sampled for lp in s.logprobs)


def test_min_tokens_through_the_native_backend():
    net = tiny()
    stop = sample(net, PROMPTS, 1, temperature=0.0)[0].token_ids[0]
    net.config.eos_token_id = stop
    cfg = SamplingConfig(n=2, temperature=1.0, max_tokens=10, seed=3)
    free = NativeRollout(network=net).generate(PROMPTS, cfg.model_copy(update={"temperature": 0.0}))
    assert any(r.finish_reason == "stop" for r in free)                      # positive control: it can stop
    forced = NativeRollout(network=net).generate(PROMPTS, cfg.model_copy(update={"min_tokens": 10}))
    assert all(len(r.token_ids) == 10 and r.finish_reason == "length" for r in forced)   # sampling.min_tokens


def test_per_row_seeds_do_not_depend_on_the_batch():
    net = tiny()
    seeds = [11, 12, 13]
    together = sample(net, PROMPTS, 8, temperature=1.0, seed=seeds, return_routing=True)
    for i, p in enumerate(PROMPTS):
        alone = sample(net, [p], 8, temperature=1.0, seed=[seeds[i]], return_routing=True)[0]
        assert alone.token_ids == together[i].token_ids
        torch.testing.assert_close(torch.tensor(alone.logprobs), torch.tensor(together[i].logprobs), atol=1e-5, rtol=0)
        for a, b in zip(alone.routed_experts, together[i].routed_experts):
            assert a.shape == b.shape == (len(p) + len(alone.token_ids), net.config.num_experts_per_tok)


def test_inverse_cdf_draws_follow_the_model_distribution():
    net = tiny()
    prompt = PROMPTS[1]
    n = 4000
    draws = sample(net, [prompt] * n, 1, temperature=1.0, seed=list(range(n)))
    with torch.no_grad():
        probs = net(torch.tensor([prompt])).logits[0, -1].float().softmax(-1)
    counts = torch.bincount(torch.tensor([s.token_ids[0] for s in draws]), minlength=probs.numel()).float()
    top = probs.topk(5).indices
    expected = probs[top] * n
    assert torch.all((counts[top] - expected).abs() <= 4 * expected.sqrt() + 3), (counts[top], expected)
    assert counts[probs < 1e-6].sum() <= 2                           # (almost) impossible tokens are not drawn
