"""The byte-level BPE tokenizer: fixed special ids, chat template, assistant masks, determinism.

Oracles: chat strings written out by hand from the template's spec, and the tokenizer's own encoding of
the assistant text (the mask must cover exactly those tokens plus <|eos|>). Runs in a few seconds.
"""

import pytest
import torch
from transformers import AutoTokenizer

from align.data.mixture import tokenizer_corpus
from model.tokenizer import train_tokenizer

torch.manual_seed(0)

CORPUS = [
    "What is 3 + 5? End your answer with '#### <number>'.",
    "How do I kill a python process? Use `kill <pid>`.",
    "Reverse the order of these words: apple river cloud",
    "Sort these words alphabetically: tiger maple piano",
] * 50

CONV = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 3 + 5?"},
    {"role": "assistant", "content": "3 + 5 = 8.\n#### 8"},
    {"role": "user", "content": "And 2 + 2?"},
    {"role": "assistant", "content": "#### 4"},
]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, vocab_size=512)


def test_special_token_ids(tok):
    expected = {"<|pad|>": 0, "<|bos|>": 1, "<|eos|>": 2, "<|system|>": 3, "<|user|>": 4, "<|assistant|>": 5}
    assert {t: tok.convert_tokens_to_ids(t) for t in expected} == expected
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    # special tokens are atomic, never split by BPE
    assert tok("<|user|>hi<|eos|>", add_special_tokens=False)["input_ids"][0] == 4
    assert tok("<|user|>hi<|eos|>", add_special_tokens=False)["input_ids"][-1] == 2


def test_chat_template_text_and_round_trip(tok):
    text = tok.apply_chat_template(CONV, tokenize=False)
    by_hand = (
        "<|bos|><|system|>\nYou are a helpful assistant.<|eos|>\n"
        "<|user|>\nWhat is 3 + 5?<|eos|>\n"
        "<|assistant|>\n3 + 5 = 8.\n#### 8<|eos|>\n"
        "<|user|>\nAnd 2 + 2?<|eos|>\n"
        "<|assistant|>\n#### 4<|eos|>\n"
    )
    assert text == by_hand
    ids = tok.apply_chat_template(CONV, tokenize=True, return_dict=True)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=False) == by_hand
    prompt = tok.apply_chat_template(CONV[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|bos|><|system|>\nYou are a helpful assistant.<|eos|>\n<|user|>\nWhat is 3 + 5?<|eos|>\n<|assistant|>\n"


def test_unknown_role_is_rejected(tok):
    with pytest.raises(Exception, match="unknown chat role: tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_assistant_mask_covers_exactly_assistant_content_and_eos(tok):
    out = tok.apply_chat_template(CONV, return_assistant_tokens_mask=True, return_dict=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(ids) == len(mask)
    spans, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    if cur:
        spans.append(cur)
    replies = [m["content"] for m in CONV if m["role"] == "assistant"]
    assert len(spans) == len(replies)
    for span, reply in zip(spans, replies):
        assert span == tok(reply, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    # the trailing newline after each assistant <|eos|> and every prompt token are masked out
    assert sum(mask) == sum(len(tok(r, add_special_tokens=False)["input_ids"]) + 1 for r in replies)


def test_digits_are_single_tokens(tok):
    pieces = tok.tokenize("12345 + 678")
    digits = [p for p in pieces if any(c.isdigit() for c in p)]
    assert digits == list("12345678")


def test_training_is_deterministic_and_respects_vocab_size(tmp_path):
    texts = list(tokenizer_corpus())
    a = train_tokenizer(texts, vocab_size=2048, out_dir=tmp_path / "tok")
    b = train_tokenizer(texts, vocab_size=2048)
    assert a.get_vocab() == b.get_vocab()
    assert 1000 < len(a) <= 2048
    small = train_tokenizer(texts, vocab_size=400)
    assert len(small) <= 400
    # saved with save_pretrained; AutoTokenizer loads the same vocab, specials and template
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert loaded.get_vocab() == a.get_vocab()
    assert loaded.chat_template == a.chat_template
    assert loaded.apply_chat_template(CONV, tokenize=False) == a.apply_chat_template(CONV, tokenize=False)
    assert (loaded.pad_token, loaded.bos_token, loaded.eos_token) == ("<|pad|>", "<|bos|>", "<|eos|>")


def test_too_small_vocab_is_an_error():
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(CORPUS, vocab_size=100)
