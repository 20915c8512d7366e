"""Both rollout backends on OUR saved tiny checkpoint: n samples with logprobs that the trainer's
recomputation matches, and vLLM's greedy generations equal our network's token for token."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import model
from engine.logprobs import token_logprobs
from engine.rollout_native import NativeRollout
from engine.sampling import SamplingConfig

PROMPTS = [[1, 17, 99, 5, 300], [1, 42, 7], [1, 8, 8, 8, 8, 1000, 2000, 12]]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    net = model.build("tiny", seed=0)
    with torch.no_grad():  # larger logits than the 0.02 init, so sampling and greedy are not all ties
        net.lm_head.weight.mul_(20)
    net.save_pretrained(d)
    return d


def trainer_logprobs(net, rollouts) -> list[np.ndarray]:
    out = []
    with torch.no_grad():
        for r in rollouts:
            ids = torch.tensor([r.prompt_token_ids + r.token_ids])
            lp = token_logprobs(net(ids).logits[:, :-1].float(), ids[:, 1:])[0]
            out.append(lp[len(r.prompt_token_ids) - 1:].numpy())
    return out


def check_samples(rollouts, n):
    assert len(rollouts) == n * len(PROMPTS)
    assert sorted(r.prompt_index for r in rollouts) == sorted(i for i in range(len(PROMPTS)) for _ in range(n))
    for r in rollouts:
        assert r.prompt_token_ids == PROMPTS[r.prompt_index]
        assert len(r.logprobs) == len(r.token_ids) > 0


def test_native_logprobs_match_trainer(tiny_dir):
    net = model.from_pretrained(tiny_dir)
    rollouts = NativeRollout(tiny_dir).generate(PROMPTS, SamplingConfig(n=4, temperature=1.0, max_tokens=16, seed=0))
    check_samples(rollouts, 4)
    diffs = np.concatenate([np.abs(t - np.array(r.logprobs)) for t, r in zip(trainer_logprobs(net, rollouts), rollouts)])
    assert diffs.mean() <= 1e-4
    assert all(r.routed_experts is not None and len(r.routed_experts) == 3 for r in rollouts)


def test_vllm_matches_our_network(tiny_dir):
    from engine.rollout_vllm import VLLMRollout

    net = model.from_pretrained(tiny_dir)
    engine = VLLMRollout(tiny_dir, precision="exact", seed=0, max_model_len=256)
    try:
        sampled = engine.generate(PROMPTS, SamplingConfig(n=4, temperature=1.0, max_tokens=16, seed=0))
        check_samples(sampled, 4)
        diffs = np.concatenate([np.abs(t - np.array(r.logprobs))
                                for t, r in zip(trainer_logprobs(net, sampled), sampled)])
        assert diffs.mean() <= 1e-4, diffs.mean()
        greedy = SamplingConfig(n=1, temperature=0.0, max_tokens=24, stop_token_ids=[])
        theirs = sorted(engine.generate(PROMPTS, greedy), key=lambda r: r.prompt_index)
        ours = sorted(NativeRollout(network=net).generate(PROMPTS, greedy), key=lambda r: r.prompt_index)
        for a, b in zip(theirs, ours):
            assert a.token_ids == b.token_ids
    finally:
        engine.shutdown()
