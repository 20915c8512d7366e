"""`reward_model` reward: a Hugging Face sequence-classification model scores (prompt, completion).

The policy's tokenizer/template are irrelevant here: every RM re-tokenises the conversation with
its OWN tokenizer and chat template ([user, assistant] messages), as it saw during its training;
without a chat template, prompt + completion is scored as plain text. The score is
logits[:, label_index] (a single-logit RM uses index 0) at the last non-padding token.

Plain class on purpose: engine/align wrap it in a Ray actor and an offload scheduler uses
`offload()` / `onload()` / `resident_bytes()` to share accelerator memory with the policy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rewards.errors import RewardError, RewardSpecError


class RewardModelScorer:
    def __init__(self, path: str | Path, batch_size: int = 8, device: str = "cpu", max_length: int = 2048,
                 dtype: str | None = None, label_index: int = 0):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: PLC0415  (heavy)

        path = Path(path)
        if not path.is_dir():
            raise RewardSpecError(f"reward model: {path} is not a directory (a local model is required)")
        self.path, self.batch_size, self.max_length, self.label_index = path, batch_size, max_length, label_index
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        kwargs = {"dtype": getattr(torch, dtype)} if dtype else {}
        self.model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True, **kwargs)
        if not 0 <= label_index < self.model.config.num_labels:
            raise RewardSpecError(f"reward model {path}: label_index {label_index} but num_labels="
                                  f"{self.model.config.num_labels}")
        tok = self.tokenizer
        if tok.pad_token is None:  # batching needs one; the model must know it to find the last token
            tok.pad_token = tok.eos_token or tok.unk_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = tok.pad_token_id
        tok.padding_side = "right"
        tok.truncation_side = "left"  # the score is read at the end: keep the completion's tail
        self.device = torch.device(device)
        self.model.eval().to(self.device)
        self._resident = True

    def format(self, prompt: str, completion: str) -> str:
        """The text the RM scores: its own chat template, else plain concatenation."""
        if self.tokenizer.chat_template:
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return prompt + completion

    @torch.no_grad()
    def score(self, prompts: list[str], completions: list[str]) -> list[float]:
        if not self._resident:
            raise RewardError(f"reward model {self.path} is offloaded; call onload() before scoring")
        texts = [self.format(p, c) for p, c in zip(prompts, completions, strict=True)]
        # A chat template already contains its special tokens (BOS...); plain text gets them added.
        special = not self.tokenizer.chat_template
        scores: list[float] = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[i : i + self.batch_size], padding=True, truncation=True,
                                 max_length=self.max_length, add_special_tokens=special, return_tensors="pt")
            logits = self.model(**enc.to(self.device)).logits
            scores.extend(logits[:, self.label_index].float().cpu().tolist())
        return scores

    def __call__(self, prompts: list[str], completions: list[str], **_: Any) -> list[float]:
        return self.score(prompts, completions)

    def offload(self) -> None:
        """Move the weights to host memory, freeing the accelerator."""
        self.model.to("cpu")
        self._resident = False
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def onload(self, device: str | None = None) -> None:
        """Move the weights (back) to `device` (default: the one given at construction)."""
        if device is not None:
            self.device = torch.device(device)
        self.model.to(self.device)
        self._resident = True

    def resident_bytes(self) -> int:
        """Bytes of weights and buffers this scorer holds on its compute device (0 when offloaded)."""
        if not self._resident:
            return 0
        tensors = [*self.model.parameters(), *self.model.buffers()]
        return sum(t.numel() * t.element_size() for t in tensors)
