"""A small byte-level BPE tokenizer with a chat template, trained locally.

Why our own: there is no hub access, and the tiny presets need a vocabulary that fits
`vocab_size=2048`. Digits are split one per token so arithmetic is learnable by small models.
The chat template marks every assistant turn (including its end-of-turn token) with
`{% generation %}` so TRL's `assistant_only_loss` and
`apply_chat_template(return_assistant_tokens_mask=True)` know which tokens to train on.

This module depends on nothing else of ours; callers pass the training texts in.
"""

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
SYSTEM, USER, ASSISTANT = "<|system|>", "<|user|>", "<|assistant|>"
# Order fixes the ids: <|pad|>=0, <|bos|>=1, <|eos|>=2, <|system|>=3, <|user|>=4, <|assistant|>=5.
SPECIAL_TOKENS = [PAD, BOS, EOS, SYSTEM, USER, ASSISTANT]

# bos, then each message as `<|role|>\n{content}<|eos|>\n`. The assistant's content and its <|eos|>
# sit inside {% generation %} so they (and only they) get assistant-mask 1.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|assistant|>\\n' -}}"
    "{%- generation -%}{{- message['content'] + eos_token -}}{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- elif message['role'] in ['system', 'user'] -%}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' -}}"
    "{%- else -%}"
    "{{- raise_exception('unknown chat role: ' + message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 2048, out_dir: str | Path | None = None
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` (deterministic for the same texts) and wrap it for transformers.

    `vocab_size` counts the 6 special tokens and the 256 byte symbols, so `len(tokenizer) <= vocab_size`.
    If `out_dir` is given the tokenizer is saved there with `save_pretrained`.
    """
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size={vocab_size} is too small: need >= {len(SPECIAL_TOKENS) + 256}")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)

    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens=[SYSTEM, USER, ASSISTANT],
        model_max_length=2048,
    )
    tok.chat_template = CHAT_TEMPLATE
    if len(tok) > vocab_size:  # cannot happen with BpeTrainer, but the model's embedding depends on it
        raise RuntimeError(f"tokenizer has {len(tok)} tokens > vocab_size={vocab_size}")
    if out_dir is not None:
        tok.save_pretrained(str(out_dir))
    return tok
