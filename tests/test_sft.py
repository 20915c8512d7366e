"""Full-parameter SFT of the tiny preset on level-1 sums: held-out loss falls and held-out sums get answered.

Held-out level-1 prompts are sums a + b (a < b) never seen in training; only the mirror b + a was
(see align.data.reasoning.problem_split). So accuracy there needs the sum itself to have been learned.

Threshold: >= THRESHOLD of held-out prompts answered with the right `#### n` by greedy decoding.
Chance is far below it: guessing uniformly among the 19 possible sums gets ~5%, and the best constant
answer gets at most 2 of the 13 held-out facts (~15%). Measured with these settings (200 steps,
batch 32, lr 1e-3 cosine, 1 thread): 0.54 for seed 0 (untrained 0.00); seeds 0-2 ranged 0.38-0.69.
150 steps was not enough (one seed at 0.26). About 2.5 CPU-minutes; longer in wall time on shared cores.
"""

import re

import pytest
import torch

from align.data.loading import DataSource
from align.data.reasoning import reasoning_rows
from align.models import load_policy, load_tokenizer
from align.sft import SFTConfig, evaluate_accuracy, extract_answer, generate_answers, run_sft

torch.manual_seed(0)
STEPS, BATCH = 200, 32
THRESHOLD = 0.3


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_extract_answer():
    assert extract_answer("3 + 5 = 8.\n#### 8") == "8"
    assert extract_answer("#### 1,234 and later #### -7") == "-7"
    assert extract_answer("the answer is 8") is None


def test_sft_learns_held_out_single_digit_sums(tmp_path):
    cfg = SFTConfig(
        model="tiny",
        train_data=[DataSource(source=f"bundled:reasoning_sft?levels=1&n={STEPS * BATCH}")],
        eval_data=[DataSource(source="bundled:reasoning_sft?levels=1&n=100", split="test")],
        max_len=64, max_steps=STEPS, batch_size=BATCH, lr=1e-3, lr_scheduler="cosine", warmup_steps=10,
        seed=0, output_dir=str(tmp_path / "sft"),
    )
    out = run_sft(cfg)
    m = out["metrics"]
    assert m["train_steps"] == STEPS
    assert m["eval_loss_after"] < 0.5 * m["eval_loss_before"], m

    model = load_policy(out["output_path"])
    tok = load_tokenizer(out["output_path"])
    held_out = reasoning_rows("test", n=200, seed=0, levels=[1])
    train_prompts = {r["prompt"] for r in reasoning_rows("train", n=STEPS * BATCH, seed=0, levels=[1])}
    assert held_out and not train_prompts & {r["prompt"] for r in held_out}

    acc = evaluate_accuracy(model, tok, held_out, max_new_tokens=16)
    untrained = evaluate_accuracy(load_policy("tiny", seed=0), tok, held_out, max_new_tokens=16)
    print(f"held-out level-1 accuracy: {acc:.2f} (untrained {untrained:.2f})")
    assert acc >= THRESHOLD
    assert untrained < 0.1

    # left-padded batched decoding gives the same text as decoding one prompt at a time
    prompts = [r["prompt"] for r in held_out[:6]]
    batched = generate_answers(model, tok, prompts, max_new_tokens=16)
    single = [generate_answers(model, tok, [p], max_new_tokens=16)[0] for p in prompts]
    assert batched == single
    assert all(re.search(r"#### \d+$", a) for a in batched), batched
