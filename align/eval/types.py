"""The one generation interface every evaluation protocol codes against.

Our rollout engine (vLLM or native) and the transformers adapter (`HFChatModel`) both satisfy it, so MT-Bench and
AlpacaEval never care which backend produced the text.
"""

from typing import Protocol, runtime_checkable

Message = dict[str, str]  # OpenAI-style: {"role": "system"|"user"|"assistant", "content": "..."}
Conversation = list[Message]


@runtime_checkable
class ChatModel(Protocol):
    def chat(
        self, conversations: list[Conversation], temperature: list[float] | float, max_tokens: int
    ) -> list[str]:
        """One assistant reply per conversation. `temperature` is per conversation (list) or shared (float);
        a temperature below 1e-4 means greedy decoding, as in FastChat."""
        ...


# AlpacaEval's length-controlled GLMs (alpaca_eval.metrics.glm_winrate), named here so configs need not import it.
LC_GLMS = ("length_controlled_v1", "length_controlled_noreg", "length_controlled_minimal")
