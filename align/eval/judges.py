"""Pluggable judges. Protocols build `JudgeRequest`s (FastChat / alpaca_eval prompts, already filled) and parse the
replies; a judge only turns (system, user) into text.

- OpenAIJudge: any OpenAI-compatible /chat/completions endpoint (GPT-4, a vLLM server, ...).
- LocalModelJudge: our own `ChatModel` (rollout engine or HFChatModel) as the judge.
- RewardModelJudge: a sequence-classification reward model for smoke runs. It never reads the judge prompt; it scores
  the judged dialogs and writes a verdict in the format the protocol parses. Its numbers are NOT MT-Bench/AlpacaEval.
"""

import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import httpx
import torch

from align.eval.errors import EvalError, JudgeAPIError
from align.eval.types import ChatModel, Conversation

REWARD_MODEL_CAVEAT = "reward-model judge: not comparable with published MT-Bench/AlpacaEval numbers"
RETRY_STATUS = {408, 409, 425, 429}  # plus every 5xx


@dataclass(frozen=True)
class JudgeRequest:
    system: str
    user: str
    verdict: Literal["rating", "pair", "alpaca"]  # reply format parsed: [[n]] | [[A]]/[[B]]/[[C]] | m/M
    dialogs: tuple[Conversation, ...] = ()  # judged dialog(s): (answer,) for grading, (A, B) / (m, M) for pairs


class Judge:
    """`complete` is the whole contract; `judge` batches it (judges override it to parallelise or batch)."""

    name: str = "judge"
    caveat: str | None = None  # printed at the top of every report this judge produced

    def complete(self, system: str, user: str) -> str:
        raise NotImplementedError

    def judge(self, requests: list[JudgeRequest]) -> list[str]:
        return [self.complete(r.system, r.user) for r in requests]

    def first_token_logprobs(self, requests: list[JudgeRequest]) -> list[dict[str, float] | None]:
        """Top log-probs of the judge's first reply token, per request ({token: logprob}); None where the judge
        cannot give them (then the caller parses the reply text instead). Judges without log-probs: all None."""
        return [None] * len(requests)


class OpenAIJudge(Judge):
    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = None,
        temperature: float = 0.0,
        max_tokens: int = 2048,
        timeout_s: float = 120.0,
        max_retries: int = 5,
        backoff_s: float = 1.0,
        concurrency: int = 4,
        logprobs: bool = True,
    ):
        """logprobs: ask for the first token's top log-probs where a protocol uses them (AlpacaEval 2.0's
        weighted annotator); an endpoint that returns none falls back to the reply text."""
        headers = {}
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise EvalError(f"judge.api_key_env: environment variable {api_key_env} is not set")
            headers["Authorization"] = f"Bearer {key}"
        self.base_url, self.model, self.name = base_url.rstrip("/"), model, model
        self.temperature, self.max_tokens = temperature, max_tokens
        self.max_retries, self.backoff_s, self.concurrency = max_retries, backoff_s, concurrency
        self.logprobs = logprobs
        self._client = httpx.Client(base_url=self.base_url, headers=headers, timeout=httpx.Timeout(timeout_s))

    def _messages(self, system: str, user: str) -> list[dict]:
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]

    def complete(self, system: str, user: str) -> str:
        body = self._post({"model": self.model, "messages": self._messages(system, user),
                           "temperature": self.temperature, "max_tokens": self.max_tokens})
        return body["choices"][0]["message"]["content"] or ""

    def _first_token_logprobs(self, system: str, user: str) -> dict[str, float] | None:
        # weighted_alpaca_eval_gpt4_turbo's request: one token, temperature 1, the top 5 log-probs.
        body = self._post({"model": self.model, "messages": self._messages(system, user), "temperature": 1.0,
                           "max_tokens": 1, "logprobs": True, "top_logprobs": 5})
        try:
            top = body["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
            return {t["token"]: float(t["logprob"]) for t in top}
        except (KeyError, IndexError, TypeError, ValueError):
            return None

    def first_token_logprobs(self, requests: list[JudgeRequest]) -> list[dict[str, float] | None]:
        if not self.logprobs:
            return [None] * len(requests)
        with ThreadPoolExecutor(max_workers=max(1, self.concurrency)) as pool:
            return list(pool.map(lambda r: self._first_token_logprobs(r.system, r.user), requests))

    def _post(self, payload: dict) -> dict:
        """POST /chat/completions with retries on transport errors, 408/409/425/429 and 5xx; the parsed body."""
        err = ""
        for attempt in range(self.max_retries + 1):
            wait = self.backoff_s * 2**attempt
            try:
                r = self._client.post("/chat/completions", json=payload)
            except httpx.TransportError as e:  # connection refused/reset, timeouts
                err = f"{type(e).__name__}: {e}"
            else:
                if r.status_code == 200:
                    try:
                        body = r.json()
                        body["choices"][0]["message"]["content"]
                        return body
                    except (ValueError, KeyError, IndexError, TypeError):
                        err = f"malformed response body {r.text[:200]!r}"
                elif r.status_code in RETRY_STATUS or r.status_code >= 500:
                    err = f"HTTP {r.status_code}"
                    retry_after = r.headers.get("retry-after", "")
                    wait = float(retry_after) if retry_after.replace(".", "", 1).isdigit() else wait
                else:  # bad key, unknown model, bad request: retrying cannot help
                    raise JudgeAPIError(f"judge {self.base_url} model {self.model!r}: HTTP {r.status_code}: {r.text[:200]}")
            if attempt < self.max_retries:
                time.sleep(min(wait, 60.0))
        raise JudgeAPIError(f"judge {self.base_url} model {self.model!r}: gave up after {self.max_retries + 1} attempts ({err})")

    def judge(self, requests: list[JudgeRequest]) -> list[str]:
        with ThreadPoolExecutor(max_workers=max(1, self.concurrency)) as pool:
            return list(pool.map(lambda r: self.complete(r.system, r.user), requests))

    def close(self) -> None:
        self._client.close()


class LocalModelJudge(Judge):
    """A `ChatModel` as judge, greedy like the API judges (temperature 0)."""

    def __init__(self, chat_model: ChatModel, name: str = "local-judge", max_tokens: int = 2048):
        self.chat_model, self.name, self.max_tokens = chat_model, name, max_tokens

    def complete(self, system: str, user: str) -> str:
        return self.judge([JudgeRequest(system, user, "rating")])[0]

    def judge(self, requests: list[JudgeRequest]) -> list[str]:
        convs = [[{"role": "system", "content": r.system}, {"role": "user", "content": r.user}] for r in requests]
        return self.chat_model.chat(convs, temperature=0.0, max_tokens=self.max_tokens) if convs else []


class RewardModelJudge(Judge):
    """Scores dialogs with a reward model (num_labels=1). Rating = round(1 + 9*sigmoid((r - center)/scale));
    pairs compare the two rewards (within `tie_margin` = tie)."""

    caveat = REWARD_MODEL_CAVEAT

    def __init__(
        self,
        path: str | Path,
        center: float = 0.0,
        scale: float = 1.0,
        tie_margin: float = 0.0,
        max_length: int = 4096,
        batch_size: int = 4,
        device: str = "cpu",
    ):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.path = Path(path)
        if not self.path.exists():
            raise EvalError(f"judge.path: reward model {self.path} not found")
        self.name = f"reward-model-{self.path.name}"
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        if not self.tokenizer.chat_template:
            raise EvalError(f"judge.path: {self.path} tokenizer has no chat_template to render dialogs")
        self.model = AutoModelForSequenceClassification.from_pretrained(self.path).to(device).eval()
        if self.model.config.num_labels != 1:
            raise EvalError(f"judge.path: {self.path} has num_labels={self.model.config.num_labels}, a reward model has 1")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.tokenizer.padding_side = "right"
        self.center, self.scale, self.tie_margin = center, scale, tie_margin
        self.max_length, self.batch_size, self.device = max_length, batch_size, device

    def complete(self, system: str, user: str) -> str:
        raise EvalError("reward-model judge scores dialogs, not free-text prompts: call judge() with JudgeRequests")

    @torch.inference_mode()
    def score(self, dialogs: list[Conversation]) -> list[float]:
        texts = [self.tokenizer.apply_chat_template(d, tokenize=False) for d in dialogs]
        rewards: list[float] = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                texts[i : i + self.batch_size], padding=True, truncation=True, max_length=self.max_length,
                add_special_tokens=False, return_tensors="pt",
            ).to(self.device)
            rewards += self.model(**enc).logits[:, 0].float().tolist()
        return rewards

    def rating(self, reward: float) -> int:
        return int(round(1 + 9 / (1 + math.exp(-(reward - self.center) / self.scale))))

    def judge(self, requests: list[JudgeRequest]) -> list[str]:
        flat = [d for r in requests for d in r.dialogs]
        rewards = iter(self.score(flat))
        replies = []
        for r in requests:
            rs = [next(rewards) for _ in r.dialogs]
            if r.verdict == "rating" and len(rs) == 1:
                replies.append(f"{REWARD_MODEL_CAVEAT}. reward={rs[0]:.4f}. Rating: [[{self.rating(rs[0])}]]")
            elif r.verdict == "pair" and len(rs) == 2:
                d = rs[0] - rs[1]
                v = "[[A]]" if d > self.tie_margin else "[[B]]" if d < -self.tie_margin else "[[C]]"
                replies.append(f"{REWARD_MODEL_CAVEAT}. reward_a={rs[0]:.4f} reward_b={rs[1]:.4f}. {v}")
            elif r.verdict == "alpaca" and len(rs) == 2:
                replies.append("m" if rs[0] >= rs[1] else "M")  # the protocol expects the bare identifier
            else:
                raise EvalError(f"reward-model judge: request {r.verdict!r} with {len(rs)} dialogs is not supported")
        return replies
