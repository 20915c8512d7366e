"""Prompts: loading every column of the data sources, a seeded resumable stream, chat-template encoding."""
from __future__ import annotations

import random

from align.data.loading import load_rows
from engine.sampling import Rollout


class PromptStream:
    """Seeded, resumable pass over the prompts: reshuffled every epoch, position saved in checkpoints."""

    def __init__(self, rows: list[dict], seed: int):
        self.rows, self.seed, self.epoch, self.pos = rows, seed, 0, 0
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        order = list(range(len(self.rows)))
        random.Random(self.seed + self.epoch).shuffle(order)
        return order

    def take(self, n: int) -> list[dict]:
        out = []
        while len(out) < n:
            if self.pos == len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._shuffle()
            out.append(self.rows[self._order[self.pos]])
            self.pos += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._order = self._shuffle()


def load_prompt_rows(sources) -> list[dict]:
    """All rows of all sources, every column kept (math rows carry `answer`, code rows `tests`), plus
    `data_source`: the source's label (DataSource.label), which reward components can scope to (`where`)."""
    rows: list[dict] = []
    for src in sources:
        ds, _ = load_rows(src.source, src.split, src.columns, ("prompt",), src.on_bad_rows)
        rows.extend({**row, "data_source": src.label} for row in ds.to_list())
    return rows


def encode_prompts(tokenizer, rows: list[dict], system_prompt: str | None) -> list[list[int]]:
    out = []
    for row in rows:
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else [])
        messages.append({"role": "user", "content": row["prompt"]})
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


def reward_inputs(rows: list[dict], rollouts: list[Rollout]) -> tuple[list[str], list[str], dict[str, list]]:
    """Prompts, completions and each extra dataset column, one entry per sampled completion."""
    prompts = [rows[r.prompt_index]["prompt"] for r in rollouts]
    completions = [r.text for r in rollouts]
    keys = {k for row in rows for k in row if k not in ("prompt", "messages")}
    columns = {k: [rows[r.prompt_index].get(k) for r in rollouts] for k in sorted(keys)}
    return prompts, completions, columns
