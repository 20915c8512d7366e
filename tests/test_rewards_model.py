"""RewardModelScorer on a tiny random Llama sequence classifier with a locally built tokenizer:
scores equal a direct forward of the same model on the same text, with and without a chat
template; batching/padding does not change them; offload/onload/resident_bytes; token lengths."""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

from rewards import RewardError, RewardSet, RewardSpecError
from rewards.model_reward import RewardModelScorer
from rewards.rule import length_penalty

TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }}"
            "{% if not loop.last %} | {% endif %}{% endfor %}{{ eos_token }}")
WORDS = "user assistant : | what is two plus four it five the sky blue green yes no maybe hello world again".split()
PROMPTS = ["what is two plus two", "is the sky blue", "hello"]
COMPLETIONS = ["four", "yes it is blue the sky is blue", "hello world again maybe"]


def build(tmp_path, chat_template: bool, num_labels: int = 1):
    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(specials + WORDS))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>", chat_template=TEMPLATE if chat_template else None)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      num_labels=num_labels, pad_token_id=vocab["<pad>"])
    model = LlamaForSequenceClassification(cfg).eval()
    path = tmp_path / ("rm_chat" if chat_template else "rm_plain")
    tok.save_pretrained(path)
    model.save_pretrained(path)
    return path, model, tok


def direct_scores(model, tok, texts, add_special_tokens, label=0):
    """Oracle: one unpadded forward per text; the logit at the last token."""
    out = []
    with torch.no_grad():
        for text in texts:
            ids = tok(text, add_special_tokens=add_special_tokens, return_tensors="pt")["input_ids"]
            out.append(model(input_ids=ids).logits[0, label].item())
    return out


def test_scores_equal_direct_forward_with_the_rm_chat_template(tmp_path):
    path, model, tok = build(tmp_path, chat_template=True)
    scorer = RewardModelScorer(path, batch_size=2, device="cpu", max_length=64)
    # The RM's own template, rendered by hand.
    texts = [f"<s>user : {p} | assistant : {c}</s>" for p, c in zip(PROMPTS, COMPLETIONS)]
    assert [scorer.format(p, c) for p, c in zip(PROMPTS, COMPLETIONS)] == texts
    assert "<unk>" not in tok.convert_ids_to_tokens(tok(texts[1])["input_ids"])
    expected = direct_scores(model, tok, texts, add_special_tokens=False)
    got = scorer(PROMPTS, COMPLETIONS, answer=["ignored"] * 3)
    assert got == pytest.approx(expected, abs=1e-5)
    assert len(set(round(x, 4) for x in got)) == 3  # a real, input-dependent score
    assert RewardModelScorer(path, batch_size=3).score(PROMPTS, COMPLETIONS) == pytest.approx(expected, abs=1e-5)


def test_without_chat_template_scores_plain_concatenation(tmp_path):
    path, model, tok = build(tmp_path, chat_template=False)
    scorer = RewardModelScorer(path, batch_size=2)
    texts = [p + " " + c for p, c in zip(PROMPTS, COMPLETIONS)]
    got = scorer([p + " " for p in PROMPTS], COMPLETIONS)
    assert got == pytest.approx(direct_scores(model, tok, texts, add_special_tokens=True), abs=1e-5)


def test_multi_label_uses_label_index(tmp_path):
    path, model, tok = build(tmp_path, chat_template=True, num_labels=3)
    texts = [f"<s>user : {p} | assistant : {c}</s>" for p, c in zip(PROMPTS, COMPLETIONS)]
    got = RewardModelScorer(path, label_index=2).score(PROMPTS, COMPLETIONS)
    assert got == pytest.approx(direct_scores(model, tok, texts, False, label=2), abs=1e-5)
    with pytest.raises(RewardSpecError, match="label_index 3"):
        RewardModelScorer(path, label_index=3)


def test_offload_onload_and_resident_bytes(tmp_path):
    path, model, _ = build(tmp_path, chat_template=True)
    scorer = RewardModelScorer(path)
    before = scorer.score(PROMPTS, COMPLETIONS)
    nbytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert scorer.resident_bytes() == nbytes > 0
    scorer.offload()
    assert scorer.resident_bytes() == 0
    with pytest.raises(RewardError, match="offloaded"):
        scorer.score(PROMPTS, COMPLETIONS)
    scorer.onload("cpu")
    assert scorer.resident_bytes() == nbytes
    assert scorer.score(PROMPTS, COMPLETIONS) == before


def test_reward_model_as_a_reward_set_component(tmp_path):
    path, model, tok = build(tmp_path, chat_template=True)
    rs = RewardSet([{"spec": "reward_model", "name": "helpful", "weight": 2.0,
                     "kwargs": {"path": str(path), "batch_size": 2}}])
    out = rs.score(PROMPTS, COMPLETIONS, answer=["a", "b", "c"])
    texts = [f"<s>user : {p} | assistant : {c}</s>" for p, c in zip(PROMPTS, COMPLETIONS)]
    expected = direct_scores(model, tok, texts, False)
    assert out.total == pytest.approx([2 * x for x in expected], abs=1e-5)
    with pytest.raises(RewardSpecError, match="not a directory"):
        RewardSet([{"spec": "reward_model", "kwargs": {"path": str(tmp_path / "missing")}}])


def test_length_penalty_in_tokens(tmp_path):
    path, _, _ = build(tmp_path, chat_template=False)
    comps = ["hello world", "hello world again maybe yes", "what is two plus two four five"]  # 2, 5, 7 tokens
    assert length_penalty(["q"] * 3, comps, target=4, unit="tokens", tokenizer=str(path)) == pytest.approx(
        [0.0, -0.25, -0.75])
