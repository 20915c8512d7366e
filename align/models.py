"""Where align gets its networks and tokenizers from, and how it saves them.

Everything that builds or loads a policy or reward network goes through `load_policy` and
`load_reward_model`: our own `model/` network, checkpoint-compatible with transformers' DeepseekV2. A preset name ("tiny") builds a freshly initialised model; anything else
is a checkpoint directory in the Hugging Face layout.
"""

import functools
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoTokenizer, DeepseekV2Config, PreTrainedModel, PreTrainedTokenizerBase

import model

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


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_atomically(save: Callable[[Path], None], final_dir: str | Path) -> Path:
    """Run `save(tmp_dir)`, fsync it, then swap it in for `final_dir` by renames.

    A crash leaves either the old checkpoint or the new one at `final_dir`, never a half-written one.
    """
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.tmp-", dir=final_dir.parent))
    try:
        save(tmp)
        _fsync_tree(tmp)
        old = None
        if final_dir.exists():
            old = final_dir.parent / f".{final_dir.name}.old-{os.getpid()}"
            os.replace(final_dir, old)
        os.replace(tmp, final_dir)
        if old is not None:
            shutil.rmtree(old)
        fd = os.open(final_dir.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final_dir
