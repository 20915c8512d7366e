"""Which answer style a checkpoint picks on held-out two-digit sums, and how accurate each style is.

    .venv/bin/python benchmarks/reasoning_styles.py runs/quickstart/sft_final/model [--n 400]

Prints, for greedy decoding on `n` held-out level-6 prompts (bundled:reasoning, split test): accuracy; the
share of answers worked column by column vs bare ('#### n' / 'Answer: n' at once) and each style's accuracy;
and the accuracy of the worked method when the answer is made to start with it (the first column's digit as
an assistant prefix): what stage 1 can reach by moving every answer to that style. The SFT recipes'
comments quote its figures.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from align.data.reasoning import reasoning_rows  # noqa: E402
from align.eval.engine_chat import EngineChatModel  # noqa: E402
from engine.sampling import SamplingConfig  # noqa: E402

_ANSWER = re.compile(r"(?:####|Answer:)\s*(-?\d+)")


def answer(text: str) -> str | None:
    hits = _ANSWER.findall(text)
    return hits[-1] if hits else None


def first_number(text: str) -> int:
    return int(re.search(r"\d+", text).group(0))


def is_bare(text: str) -> bool:
    return text.lstrip().startswith(("####", "Answer:"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--max-tokens", type=int, default=48)
    a = ap.parse_args()
    rows = reasoning_rows("test", a.n, 0, (6,))
    chat = EngineChatModel(a.model, "native")
    tok = chat.tokenizer
    try:
        free = chat.chat([[{"role": "user", "content": r["prompt"]}] for r in rows], 0.0, a.max_tokens)
        prefixes = [f"{first_number(r['prompt']) % 10} +" for r in rows]
        ids = [tok(tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                           tokenize=False) + p, add_special_tokens=False)["input_ids"]
               for r, p in zip(rows, prefixes)]
        forced = [""] * a.n
        for out in chat.engine.generate(ids, SamplingConfig(n=1, temperature=0.0, max_tokens=a.max_tokens, seed=0)):
            forced[out.prompt_index] = prefixes[out.prompt_index] + out.text
    finally:
        chat.close()
    right = [answer(t) == r["answer"] for t, r in zip(free, rows)]
    bare = [is_bare(t) for t in free]
    worked_right = [x for x, b in zip(right, bare) if not b]
    bare_right = [x for x, b in zip(right, bare) if b]
    forced_right = [answer(t) == r["answer"] for t, r in zip(forced, rows)]

    def share(xs: list[bool]) -> str:
        return f"{sum(xs) / len(xs):.3f}" if xs else "n/a"
    print(f"{a.model} (n={a.n}, greedy): accuracy {share(right)}; worked {len(worked_right) / a.n:.2f} of answers "
          f"(accuracy {share(worked_right)}), bare {len(bare_right) / a.n:.2f} (accuracy {share(bare_right)}); "
          f"worked method when made to start it: {share(forced_right)}")


if __name__ == "__main__":
    main()
