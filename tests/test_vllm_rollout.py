"""VLLMRollout against transformers' DeepseekV2 as the oracle: log-probs, greedy tokens, sampling knobs.

The checkpoint is a tiny random DeepseekV2 (MLA + MoE) saved with a locally trained BPE tokenizer,
so the text paths (detokenized text, stop strings) run too; test_refit.py covers the tokenizer-less
path. vLLM starts once for the file (module fixture).
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from pydantic import ValidationError

from engine.rollout_vllm import VLLMRollout, _eos_token_ids
from engine.sampling import SamplingConfig

PROMPTS = [[1, 5, 6, 7], [1, 9, 10], [1, 100, 200, 300, 400], [1, 2000, 3, 4, 17, 1023]]


def tiny_config():
    from transformers import DeepseekV2Config

    return DeepseekV2Config(
        vocab_size=2048, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
        q_lora_rank=None, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=32, v_head_dim=32,
        intermediate_size=512, moe_intermediate_size=128, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, first_k_dense_replace=1, n_group=1, topk_group=1, topk_method="greedy",
        norm_topk_prob=False, max_position_embeddings=2048, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip


def tiny_tokenizer():
    """A byte-level BPE with exactly 2048 tokens (the model's vocab), trained on made-up words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(3000)]
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(3000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2048, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(lines, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    assert len(fast) == 2048 and fast.convert_tokens_to_ids(["<pad>", "<s>", "</s>"]) == [0, 1, 2]
    return fast


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import DeepseekV2ForCausalLM

    torch.manual_seed(0)
    model = DeepseekV2ForCausalLM(tiny_config()).eval()
    path = tmp_path_factory.mktemp("tiny_dsv2")
    model.save_pretrained(path)
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the transformers oracle runs far faster single-threaded on 2 busy cores
    rollout = VLLMRollout(path, precision="exact", seed=0, max_model_len=256, kv_cache_gib=1)
    yield rollout, model, tokenizer
    rollout.shutdown()
    torch.set_num_threads(threads)


def hf_logprobs(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """transformers' log-probs of `completion` given `prompt` (one forward over the whole sequence)."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    return logp[len(prompt) - 1 : -1].gather(-1, torch.tensor(completion)[:, None])[:, 0]


def hf_greedy(model, prompt: list[int], max_new_tokens: int, eos_token_id: int = 2) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_token_id, pad_token_id=0
        )
    return out[0, len(prompt) :].tolist()


def test_n_samples_logprobs_match_transformers(setup):
    rollout, model, tokenizer = setup
    cfg = SamplingConfig(n=4, temperature=1.0, max_tokens=12, seed=7)
    rollouts = rollout.generate(PROMPTS, cfg)

    assert [r.prompt_index for r in rollouts] == [i for i in range(len(PROMPTS)) for _ in range(4)]
    diffs = []
    for r in rollouts:
        assert r.prompt_token_ids == PROMPTS[r.prompt_index]
        assert 0 < len(r.token_ids) <= 12 and len(r.logprobs) == len(r.token_ids)
        assert r.finish_reason == ("length" if len(r.token_ids) == 12 else "stop")
        # vLLM's incremental detokenizer holds back a trailing incomplete UTF-8 sequence (decode shows it as U+FFFD)
        assert r.text == tokenizer.decode(r.token_ids, skip_special_tokens=True).rstrip("\ufffd")
        assert r.routed_experts is None
        diffs.append((hf_logprobs(model, r.prompt_token_ids, r.token_ids) - torch.tensor(r.logprobs)).abs())
    assert torch.cat(diffs).mean().item() <= 1e-4
    # The n samples of a prompt, and samples across prompts, are not copies of each other.
    assert len({tuple(r.token_ids) for r in rollouts}) == len(rollouts)


def test_greedy_equals_transformers_generate(setup):
    rollout, model, _ = setup
    rollouts = rollout.generate(PROMPTS, SamplingConfig(temperature=0.0, max_tokens=16))
    assert len(rollouts) == len(PROMPTS)
    for r in rollouts:
        assert r.token_ids == hf_greedy(model, r.prompt_token_ids, 16)


def test_top_k_1_and_tiny_top_p_are_greedy(setup):
    rollout, model, _ = setup
    greedy = [r.token_ids for r in rollout.generate(PROMPTS, SamplingConfig(temperature=0.0, max_tokens=10))]
    top_k = rollout.generate(PROMPTS, SamplingConfig(n=2, temperature=1.0, top_k=1, max_tokens=10, seed=1))
    top_p = rollout.generate(PROMPTS, SamplingConfig(n=2, temperature=1.0, top_p=1e-6, max_tokens=10, seed=1))
    assert [r.token_ids for r in top_k] == [g for g in greedy for _ in range(2)]
    assert [r.token_ids for r in top_p] == [g for g in greedy for _ in range(2)]


def test_seed_reproducible_and_varies(setup):
    rollout, _, _ = setup
    a = rollout.generate(PROMPTS, SamplingConfig(n=2, max_tokens=8, seed=123))
    b = rollout.generate(PROMPTS, SamplingConfig(n=2, max_tokens=8, seed=123))
    c = rollout.generate(PROMPTS, SamplingConfig(n=2, max_tokens=8, seed=124))
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [r.logprobs for r in a] == [r.logprobs for r in b]
    assert [r.token_ids for r in a] != [r.token_ids for r in c]


def test_stop_token_ids_and_stop_strings(setup):
    rollout, model, tokenizer = setup
    prompt = PROMPTS[2]
    full = rollout.generate([prompt], SamplingConfig(temperature=0.0, max_tokens=16))[0]
    # Stop on a token first produced at position k: the completion must end right after it, like
    # transformers' generate with that token as EOS.
    k = next(
        i
        for i in range(2, 16)
        if full.token_ids[i] not in full.token_ids[:i] and tokenizer.decode(full.token_ids[i : i + 1]).strip()
    )
    stop_id = full.token_ids[k]
    r = rollout.generate([prompt], SamplingConfig(temperature=0.0, max_tokens=16, stop_token_ids=[stop_id]))[0]
    assert r.token_ids == full.token_ids[: k + 1] == hf_greedy(model, prompt, 16, eos_token_id=stop_id)
    assert r.finish_reason == "stop"
    # Stop strings cut the text before the stop string.
    stop_str = tokenizer.decode(full.token_ids[k : k + 1]).strip()
    assert stop_str and stop_str in full.text
    r = rollout.generate([prompt], SamplingConfig(temperature=0.0, max_tokens=16, stop=[stop_str]))[0]
    assert r.finish_reason == "stop"
    assert r.text == full.text[: full.text.index(stop_str)]
    assert r.token_ids == full.token_ids[: len(r.token_ids)]


def test_sleep_wake_keep_serving(setup):
    rollout, model, _ = setup
    rollout.sleep()
    rollout.wake()
    r = rollout.generate(PROMPTS[:1], SamplingConfig(temperature=0.0, max_tokens=6))[0]
    assert r.token_ids == hf_greedy(model, PROMPTS[0], 6)


def test_bad_inputs_are_rejected(setup, tmp_path):
    rollout, _, _ = setup
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        rollout.generate([[1, 2], []], SamplingConfig())
    with pytest.raises(ValidationError):
        SamplingConfig(n=0)
    with pytest.raises(ValidationError):
        SamplingConfig(temprature=0.5)  # typo: extra fields are forbidden
    with pytest.raises(FileNotFoundError, match="no config.json"):
        VLLMRollout(tmp_path)


def test_eos_ids_read_from_generation_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 2}))
    assert _eos_token_ids(tmp_path) == [2]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    assert _eos_token_ids(tmp_path) == [7, 9]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on GPU routed experts are supported")
def test_routed_experts_unavailable_on_cpu(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="routed experts"):
        VLLMRollout(tmp_path, return_routed_experts=True)
