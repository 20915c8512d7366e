"""Bundled, seeded data generators (train/test splits are disjoint) and the row loader.

See `align.data.loading` for the expected columns per stage and `bundled:NAME` sources.
"""

from align.data.chat import chat_rows
from align.data.code import code_rows
from align.data.mixture import sft_mixture_rows, tokenizer_corpus
from align.data.preference import helpful_pair_rows
from align.data.reasoning import reasoning_rows
from align.data.safety import safety_rows

__all__ = [
    "chat_rows",
    "code_rows",
    "helpful_pair_rows",
    "reasoning_rows",
    "safety_rows",
    "sft_mixture_rows",
    "tokenizer_corpus",
]
