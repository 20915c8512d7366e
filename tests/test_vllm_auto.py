"""vLLM started with the defaults a user gets (precision auto) on this machine's CPU, on a checkpoint
whose max_position_embeddings is below vLLM's own default length.

Without AMX the default is fp32 with the reference CPU_MLA kernel: exact bounds (greedy equal, mean
|dlogp| <= 1e-4). With AMX it is bf16 with vLLM's AMX kernel, checked against our fp32 network with
fixed bounds: mean |dlogp| <= 0.01, the first greedy token equal on every prompt, greedy prefix
agreement >= 90% of tokens (16 prompts x 32 tokens). Each CPU kind runs the branch it has.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

import model  # noqa: E402
from engine.sampling import SamplingConfig  # noqa: E402
from engine.vllm_mode import cpu_has_amx  # noqa: E402

N_PROMPTS, NEW = 16, 32
PROMPTS = [[1 + (7 * i + 3 * j) % 300 for j in range(3 + i % 5)] for i in range(N_PROMPTS)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from engine.rollout_vllm import VLLMRollout

    path = tmp_path_factory.mktemp("auto") / "m"
    net = model.build("tiny", seed=0, vocab_size=320, max_position_embeddings=512)
    net.save_pretrained(path)
    threads = torch.get_num_threads()
    rollout = VLLMRollout(path, seed=0, kv_cache_gib=1)   # every default: precision auto, max_model_len None
    yield rollout, model.from_pretrained(path).eval()
    rollout.shutdown()
    torch.set_num_threads(threads)


def our_logprobs(net, prompt: list[int], completion: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = net(torch.tensor([prompt + completion])).logits[0].float()
    return torch.log_softmax(logits, -1)[len(prompt) - 1:-1].gather(-1, torch.tensor(completion)[:, None])[:, 0]


def our_greedy(net, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(net(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_default_mode_matches_this_cpu(setup):
    rollout, _ = setup
    assert rollout.mode.dtype == ("bfloat16" if cpu_has_amx() else "float32")
    assert rollout.mode.attention_backend == (None if cpu_has_amx() else "CPU_MLA")


def test_default_mode_agrees_with_our_fp32_network(setup):
    rollout, net = setup
    sampled = rollout.generate(PROMPTS, SamplingConfig(n=1, temperature=1.0, max_tokens=NEW, seed=3))
    diffs = torch.cat([(our_logprobs(net, r.prompt_token_ids, r.token_ids) - torch.tensor(r.logprobs)).abs()
                       for r in sampled])
    greedy = rollout.generate(PROMPTS, SamplingConfig(temperature=0.0, max_tokens=NEW, stop_token_ids=[]))
    ours = [our_greedy(net, p, len(g.token_ids)) for p, g in zip(PROMPTS, greedy)]
    agree = 0
    for g, o in zip(greedy, ours):
        same = next((i for i, (a, b) in enumerate(zip(g.token_ids, o)) if a != b), len(o))
        agree += same
    total = sum(len(o) for o in ours)
    if rollout.mode.dtype == "float32":
        assert diffs.mean().item() <= 1e-4
        assert [g.token_ids for g in greedy] == ours
    else:
        assert diffs.mean().item() <= 0.01, f"mean |dlogp| {diffs.mean().item():.4f}, max {diffs.max().item():.3f}"
        assert all(g.token_ids[:1] == o[:1] for g, o in zip(greedy, ours))
        assert agree >= 0.9 * total, f"greedy prefix agreement {agree}/{total}"
