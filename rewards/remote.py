"""`remote` reward: score a batch with an HTTP reward service.

POSTs {"prompts": [...], "completions": [...]} (keys configurable, selected dataset columns may be
added) and reads {"scores": [...]}. Connection errors, timeouts, 429 and 5xx are retried with
exponential backoff; other 4xx, non-JSON bodies and wrong shapes fail at once (retrying would not
help). Every failure is a one-line RewardError naming the URL.

A circuit breaker makes an outage cheap: after `breaker_failures` consecutive failed attempts (by
any concurrent call of this instance) the circuit opens, and for `breaker_cooldown_s` every call
fails at once without a request; then one call at a time may try again, and a success closes it.
So when RewardSet retries a failed batch sample by sample (concurrently), an outage costs one
batch's retries, not n x retries x timeout, and ends in one line.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from rewards.combine import validate_scores
from rewards.errors import RewardError, short_repr
from rewards.registry import register


class _Retryable(Exception):
    pass


@register("remote")
class RemoteReward:
    """Async reward callable; build it once (RewardSet does, from the component's kwargs)."""

    def __init__(self, url: str, timeout_s: float = 30.0, retries: int = 3, backoff_s: float = 0.5,
                 prompts_key: str = "prompts", completions_key: str = "completions", scores_key: str = "scores",
                 columns: Sequence[str] = (), headers: Mapping[str, str] | None = None,
                 api_key_env: str | None = None, breaker_failures: int = 3, breaker_cooldown_s: float = 30.0):
        if not url.startswith(("http://", "https://")):
            raise RewardError(f"remote reward: url must start with http:// or https://, got {url!r}")
        self.url, self.timeout_s, self.retries, self.backoff_s = url, timeout_s, retries, backoff_s
        self.breaker_failures, self.breaker_cooldown_s = max(1, breaker_failures), breaker_cooldown_s
        self._consecutive_failures, self._open_until, self._last_error = 0, 0.0, ""
        self.keys = (prompts_key, completions_key, scores_key)
        self.columns = tuple(columns)
        self.headers = dict(headers or {})
        if api_key_env:  # keep secrets out of recipes: read the token from the environment
            token = os.environ.get(api_key_env)
            if not token:
                raise RewardError(f"remote reward: environment variable {api_key_env} is not set")
            self.headers["Authorization"] = f"Bearer {token}"

    async def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        missing = [c for c in self.columns if c not in columns]
        if missing:
            raise RewardError(f"remote reward {self.url}: dataset has no column(s) {missing}")
        pk, ck, sk = self.keys
        payload = {pk: list(prompts), ck: list(completions), **{c: list(columns[c]) for c in self.columns}}
        last: Exception | None = None
        attempts = 0
        self._check_circuit()  # before building a client (an SSL context costs ~0.1 s)
        async with httpx.AsyncClient(timeout=self.timeout_s) as client:
            for attempt in range(self.retries + 1):
                if attempt:
                    await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
                    self._check_circuit()
                attempts += 1
                try:
                    response = await client.post(self.url, json=payload, headers=self.headers)
                    scores = self._parse(response, sk, len(prompts))
                except (httpx.TransportError, _Retryable) as e:  # TransportError includes timeouts
                    last = e
                    self._failed(e)
                    continue
                self._consecutive_failures = 0
                return scores
        raise RewardError(f"remote reward {self.url}: {short_repr(last)} (after {attempts} attempts)")

    def _check_circuit(self) -> None:
        now = time.monotonic()
        if self._consecutive_failures >= self.breaker_failures and now < self._open_until:
            raise RewardError(f"remote reward {self.url}: circuit open after {self._consecutive_failures} consecutive "
                              f"failures (last: {self._last_error}); next try in {self._open_until - now:.0f}s")
        if self._consecutive_failures >= self.breaker_failures:
            self._open_until = now + self.breaker_cooldown_s  # half-open: this call is the probe

    def _failed(self, e: Exception) -> None:
        self._consecutive_failures += 1
        self._last_error = short_repr(e, 100)
        if self._consecutive_failures >= self.breaker_failures:
            self._open_until = time.monotonic() + self.breaker_cooldown_s

    def _parse(self, response: httpx.Response, key: str, n: int) -> list[float]:
        if response.status_code == 429 or response.status_code >= 500:
            raise _Retryable(f"HTTP {response.status_code}: {_snippet(response)}")
        if response.status_code >= 400:
            raise RewardError(f"remote reward {self.url}: HTTP {response.status_code}: {_snippet(response)}")
        try:
            data = response.json()
        except ValueError:
            raise RewardError(f"remote reward {self.url}: response is not JSON: {_snippet(response)}") from None
        if not isinstance(data, dict) or key not in data:
            raise RewardError(f"remote reward {self.url}: response has no '{key}' field: {_snippet(response)}")
        try:
            return validate_scores(data[key], n)
        except (TypeError, ValueError) as e:
            raise RewardError(f"remote reward {self.url}: '{key}' {e}") from None


def _snippet(response: httpx.Response, limit: int = 120) -> str:
    text = " ".join(response.text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
