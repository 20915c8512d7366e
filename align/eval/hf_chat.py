"""`ChatModel` over a local transformers checkpoint: chat template + `generate`.

The slow-but-simple path for local checkpoints and tests; production runs plug in the rollout engine instead.
"""

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from align.eval.errors import EvalError
from align.eval.types import Conversation

GREEDY_BELOW = 1e-4  # FastChat: temperature < 1e-4 means greedy decoding


class HFChatModel:
    def __init__(self, path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None, seed: int = 0):
        self.path = Path(path)
        if not self.path.exists():
            raise EvalError(f"{self.path}: model checkpoint not found")
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        if not self.tokenizer.chat_template:
            raise EvalError(f"{self.path}: tokenizer has no chat_template; MT-Bench/AlpacaEval answers need one")
        self.model = AutoModelForCausalLM.from_pretrained(self.path, dtype=dtype).to(device).eval()
        self.device, self.seed = device, seed
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else self.tokenizer.eos_token_id

    @torch.inference_mode()
    def chat(self, conversations: list[Conversation], temperature: list[float] | float, max_tokens: int) -> list[str]:
        temps = temperature if isinstance(temperature, list) else [temperature] * len(conversations)
        if len(temps) != len(conversations):
            raise ValueError(f"got {len(temps)} temperatures for {len(conversations)} conversations")
        torch.manual_seed(self.seed)  # sampled answers are reproducible run to run
        replies = []
        for conv, t in zip(conversations, temps):
            enc = self.tokenizer.apply_chat_template(
                conv, add_generation_prompt=True, return_tensors="pt", return_dict=True
            ).to(self.device)
            sampling = {"do_sample": True, "temperature": float(t)} if t >= GREEDY_BELOW else {"do_sample": False}
            out = self.model.generate(
                **enc, max_new_tokens=max_tokens, pad_token_id=self.pad_token_id, **sampling
            )
            new_tokens = out[0, enc["input_ids"].shape[1]:]
            replies.append(self.tokenizer.decode(new_tokens, skip_special_tokens=True).strip())
        return replies
