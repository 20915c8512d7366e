"""Rule rewards: math correctness (math-verify), exact match, format, length penalty (chars)."""

import threading

import pytest

from rewards import RewardSet
from rewards.rule import exact_match, final_answer, format_reward, last_boxed, length_penalty, math_accuracy


@pytest.mark.parametrize("completion, gold, expected", [
    ("so the result is \\boxed{42}.", "42", 1.0),
    ("Natalia sold 48 + 24 = 72 clips.\n#### 72", "72", 1.0),
    ("Working... The answer: 72.", "72", 1.0),
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),  # equivalent forms
    ("#### 0.5", "\\frac{1}{2}", 1.0),
    ("answer: 1/2", "$\\frac{1}{2}$", 1.0),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", 1.0),
    ("#### 1,234", "1234", 1.0),
    ("\\boxed{41}", "42", 0.0),  # wrong answers
    ("#### 7", "72", 0.0),
    ("\\boxed{\\frac{1}{3}}", "0.5", 0.0),
    ("I don't know", "42", 0.0),
    ("", "42", 0.0),
    ("First 42, then \\boxed{43}", "42", 0.0),  # the stated (boxed) answer counts, not any number
])
def test_math_accuracy(completion, gold, expected):
    assert math_accuracy(["q"], [completion], answer=[gold]) == [expected]


def test_math_gold_may_be_a_gsm8k_solution_and_numbers():
    gold = ["She has 3 + 4 = 7 apples.\n#### 7", 12]
    assert math_accuracy(["q", "q"], ["#### 7", "\\boxed{12}"], answer=gold) == [1.0, 1.0]


def test_math_accuracy_off_the_main_thread():
    # math-verify's signal.alarm timeouts fail off the main thread; the reward must still work there.
    out = {}
    t = threading.Thread(target=lambda: out.update(s=math_accuracy(["q"] * 2, ["\\boxed{0.5}", "#### 3"],
                                                                   answer=["1/2", "4"])))
    t.start()
    t.join()
    assert out["s"] == [1.0, 0.0]


def test_math_accuracy_in_reward_set_and_unparsable_gold():
    rs = RewardSet([{"spec": "math_accuracy"}])  # RewardSet runs sync rewards in a worker thread
    assert rs.score(["q", "q"], ["\\boxed{1/2}", "#### 1"], answer=["0.5", "2"]).total == [1.0, 0.0]
    with pytest.raises(ValueError, match="cannot parse the gold answer"):
        math_accuracy(["q"], ["#### 1"], answer=[""])


def test_final_answer_and_boxed_extraction():
    assert last_boxed("a \\boxed{1} b \\boxed{\\frac{1}{2}} c") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{unclosed") is None
    assert final_answer("blah\n#### 1,000\n") == "1,000"
    assert final_answer("The Answer is: Paris.\nbye") == "Paris"
    assert final_answer("no marker") == "no marker"


def test_exact_match():
    comps = ["  Paris ", "answer: PARIS.", "\\boxed{paris}", "Lyon", "The capital is Paris"]
    assert exact_match(["q"] * 5, comps, answer=["paris"] * 5) == [1.0, 1.0, 1.0, 0.0, 0.0]
    strict = exact_match(["q"] * 3, ["Paris", "paris", "Paris "], answer=["Paris"] * 3, normalize=False, extract=False)
    assert strict == [1.0, 0.0, 0.0]


def test_format_tags_and_regex():
    comps = [
        "<think>step 1\nstep 2</think>\n<answer>42</answer>",
        "  <think>x</think><answer>y</answer>\n",
        "<answer>42</answer><think>x</think>",  # wrong order
        "<think>x</think><answer>a</answer><answer>b</answer>",  # extra section
        "preamble <think>x</think><answer>a</answer>",  # text outside the sections
        "<think>x</think>",  # missing section
        "<think><think>x</think><answer>a</answer>",  # nested tag
    ]
    assert format_reward(["q"] * len(comps), comps) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert format_reward(["q"] * 2, ["<sol>1</sol>", "<answer>1</answer>"], tags=["sol"]) == [1.0, 0.0]
    by_regex = format_reward(["q"] * 3, ["Final: 12", "Final: x", "Final: 12 extra"], pattern=r"Final: \d+")
    assert by_regex == [1.0, 0.0, 0.0]


def test_length_penalty_chars():
    comps = ["a" * 10, "a" * 12, "a" * 20, "a" * 100]
    assert length_penalty(["q"] * 4, comps, target=10) == pytest.approx([0.0, -0.2, -1.0, -1.0])
    capped = length_penalty(["q"] * 4, comps, target=10, per_unit=0.01, max_penalty=0.5)
    assert capped == pytest.approx([0.0, -0.02, -0.1, -0.5])
    with pytest.raises(ValueError, match="needs a tokenizer"):
        length_penalty(["q"], ["x"], unit="tokens")


def test_reasoning_reward_dispatches_math_and_code_rows():
    from rewards.registry import resolve
    fn = resolve("reasoning")
    completions = ["so the answer is #### 12", "#### 7", "```python\ndef add(a, b):\n    return a + b\n```"]
    scores = fn(["q1", "q2", "q3"], completions, answer=["12", "8", None],
                tests=[None, None, "assert add(1, 2) == 3\nassert add(2, 2) == 4"], entry_point=[None, None, "add"])
    assert scores == [1.0, 0.0, 1.0]
