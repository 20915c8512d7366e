"""Where align gets its networks and tokenizers from, and how it saves them.

Everything that builds or loads a policy or reward network goes through `load_policy` and
`load_reward_model`, so switching from transformers' DeepseekV2 to our own `model/` network is a
change in this one file. A preset name ("tiny") builds a freshly initialised model; anything else
is a checkpoint directory in the Hugging Face layout.
"""

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    DeepseekV2ForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from align.data.mixture import tokenizer_corpus
from align.errors import UserError
from model.tokenizer import train_tokenizer


def tiny_config() -> DeepseekV2Config:
    """~5.7M parameters: MLA attention and MoE (8 routed experts, 1 shared) at toy scale."""
    return DeepseekV2Config(
        vocab_size=2048, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
        q_lora_rank=None, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=32, v_head_dim=32,
        intermediate_size=512, moe_intermediate_size=128, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, first_k_dense_replace=1, n_group=1, topk_group=1, topk_method="greedy",
        norm_topk_prob=False, routed_scaling_factor=1.0, max_position_embeddings=2048,
        tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )


PRESETS: dict[str, Callable[[], DeepseekV2Config]] = {"tiny": tiny_config}


def _checkpoint_dir(path: str) -> Path:
    p = Path(path)
    if not (p / "config.json").is_file():
        raise UserError(f"{path}: not a model preset ({', '.join(PRESETS)}) nor a checkpoint dir with config.json")
    return p


def load_policy(path_or_preset: str, seed: int = 0) -> PreTrainedModel:
    """A causal LM: fresh from a preset (seeded init) or loaded from a checkpoint directory."""
    if path_or_preset in PRESETS:
        torch.manual_seed(seed)
        return DeepseekV2ForCausalLM(PRESETS[path_or_preset]())
    return DeepseekV2ForCausalLM.from_pretrained(str(_checkpoint_dir(path_or_preset)), dtype=torch.float32)


def load_reward_model(path: str) -> PreTrainedModel:
    """A scalar-head sequence classifier (num_labels=1) from a causal-LM or reward checkpoint."""
    return DeepseekV2ForSequenceClassification.from_pretrained(
        str(_checkpoint_dir(path)), num_labels=1, dtype=torch.float32
    )


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
