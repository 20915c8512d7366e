"""`remote` reward: score a batch with an HTTP reward service.

POSTs {"prompts": [...], "completions": [...]} (keys configurable, selected dataset columns may be
added) and reads {"scores": [...]}. Connection errors, timeouts, 429 and 5xx are retried with
exponential backoff; other 4xx, non-JSON bodies and wrong shapes fail at once (retrying would not
help). Every failure is a one-line RewardError naming the URL.
"""

from __future__ import annotations

import asyncio
import os
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
                 api_key_env: str | None = None):
        if not url.startswith(("http://", "https://")):
            raise RewardError(f"remote reward: url must start with http:// or https://, got {url!r}")
        self.url, self.timeout_s, self.retries, self.backoff_s = url, timeout_s, retries, backoff_s
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
        async with httpx.AsyncClient(timeout=self.timeout_s) as client:
            for attempt in range(self.retries + 1):
                if attempt:
                    await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
                try:
                    response = await client.post(self.url, json=payload, headers=self.headers)
                    return self._parse(response, sk, len(prompts))
                except (httpx.TransportError, _Retryable) as e:  # TransportError includes timeouts
                    last = e
        raise RewardError(f"remote reward {self.url}: {short_repr(last)} (after {self.retries + 1} attempts)")

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
