"""Where align gets its networks and tokenizers from, and how it saves them.

Everything that builds or loads a policy or reward network goes through `load_policy` and
`load_reward_model`: our own `model/` network, checkpoint-compatible with transformers' DeepseekV2. A preset name ("tiny") builds a freshly initialised model; anything else
is a checkpoint directory in the Hugging Face layout.
"""

import functools
from collections.abc import Callable
from pathlib import Path

from transformers import AutoTokenizer, DeepseekV2Config, PreTrainedModel, PreTrainedTokenizerBase

import model
from model.atomic import atomic_dir

from align.data.mixture import tokenizer_corpus
from align.errors import UserError
from model.tokenizer import train_tokenizer


PRESETS: dict[str, Callable[[], DeepseekV2Config]] = {name: functools.partial(model.make_config, name)
                                                      for name in ("tiny",)}


def tiny_config() -> DeepseekV2Config:
    """~5.7M parameters: MLA attention and MoE (8 routed experts, 1 shared) at toy scale."""
    return model.make_config("tiny")


def _checkpoint_dir(path: str) -> Path:
    p = Path(path)
    if not (p / "config.json").is_file():
        raise UserError(f"{path}: not a model preset ({', '.join(PRESETS)}) nor a checkpoint dir with config.json")
    return p


def load_policy(path_or_preset: str, seed: int = 0) -> PreTrainedModel:
    """Our MLA/MoE causal LM (model/): fresh from a preset (seeded init) or loaded from a checkpoint directory."""
    if path_or_preset in PRESETS:
        return model.build(path_or_preset, seed=seed)
    return model.from_pretrained(str(_checkpoint_dir(path_or_preset)))


def load_reward_model(path: str) -> PreTrainedModel:
    """Our scalar-head sequence classifier (num_labels=1) from a causal-LM or reward checkpoint; it saves in the
    layout of transformers' DeepseekV2ForSequenceClassification."""
    return model.from_pretrained(str(_checkpoint_dir(path)), reward_model=True, num_labels=1)


def load_tokenizer(path_or_preset: str, seed: int = 0) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer, or for a preset one trained on the bundled data (deterministic)."""
    if path_or_preset in PRESETS:
        return train_tokenizer(tokenizer_corpus(seed), vocab_size=PRESETS[path_or_preset]().vocab_size)
    return AutoTokenizer.from_pretrained(str(_checkpoint_dir(path_or_preset)))


def save_atomically(save: Callable[[Path], None], final_dir: str | Path) -> Path:
    """Run `save(tmp_dir)`, fsync it, then swap it in for `final_dir` by renames (model.atomic.atomic_dir).

    A crash leaves either the old checkpoint or the new one at `final_dir`, never a half-written one.
    """
    atomic_dir(Path(final_dir), save)
    return Path(final_dir)
