"""No bad sample or slow scorer ends a run: per-sample timeouts score 0 and count as failures, the
run stops only on a component's failure share, hung scorers are killed (never left in a thread)."""

import os
import time

import pytest

from rewards import RewardError, RewardSet, SampleScores, check_failure_share
from rewards.rule import math_accuracy, math_pool
from tests.test_rewards_sandbox import _sandbox_snapshot, _watch

LOOP = "```python\ndef add(a, b):\n    while True:\n        pass\n```"
GOOD = "```python\ndef add(a, b):\n    return a + b\n```"
HALF = "```python\ndef add(a, b):\n    return a + b if a > 0 else 7\n```"


@pytest.mark.skipif(os.geteuid() != 0, reason="counts the sandbox children by their fresh uids (root)")
def test_a_step_with_sixteen_looping_completions_finishes_and_the_run_continues():
    completions = [LOOP] * 16 + [GOOD] * 15 + [HALF]
    rs = RewardSet([{"spec": "code", "kwargs": {"sandbox": {"timeout_s": 1, "max_workers": 4}}}])
    t0 = time.monotonic()
    out, samples = _watch(lambda: rs.score(["q"] * 32, completions,
                                           tests=[["assert add(2, 3) == 5", "assert add(-1, 1) == 0"]] * 32))
    elapsed = time.monotonic() - t0
    assert out.raw["code"] == [0.0] * 16 + [1.0] * 15 + [0.5]  # correct code 1.0, partial its share
    assert out.failures["code"] == out.timeouts["code"] == list(range(16))
    assert out.metrics["rewards/code/timeouts"] == 16.0 and out.metrics["rewards/code/failures"] == 16.0
    assert elapsed < 16 / 4 * 1.0 + 8  # no batch timeout, no waiting beyond the per-sample ones
    assert max(sum(1 for _ in live) for live in samples) <= 4  # never more children than max_workers
    assert not _sandbox_snapshot()[0]  # and none left running in the background
    check_failure_share(out, 0.5)  # 16 of 32 is not more than half: the run goes on
    with pytest.raises(RewardError) as e:
        check_failure_share(out, 0.4)
    msg = str(e.value)
    assert "\n" not in msg and "'code'" in msg and "16 of 32" in msg and "16 timeouts" in msg


def test_a_hanging_math_verify_input_is_killed_within_its_timeout():
    pool = math_pool(2)
    assert math_accuracy(["q"], ["\\boxed{2}"], answer=["2"], timeout_s=30) == [1.0]  # workers warm
    killed = pool.killed
    t0 = time.monotonic()
    got = math_accuracy(["q"] * 2, ["\\boxed{10^{10^{10}}}", "\\boxed{1/2}"], answer=["2", "0.5"], timeout_s=2.5)
    elapsed = time.monotonic() - t0
    assert (list(got), got.timed_out, got.failed) == ([0.0, 1.0], {0}, {0}), (got, got.timed_out, elapsed)
    assert pool.killed == killed + 1  # it really hung: its worker had to be killed
    assert elapsed < 2.5 + 2.0  # killed at its timeout (margin: two shared, busy cores)
    out = RewardSet([{"spec": "math_accuracy", "kwargs": {"timeout_s": 2.5}}]).score(
        ["q", "q"], ["\\boxed{10^{10^{10}}}", "#### 3"], answer=["2", "3"])
    assert out.raw["math_accuracy"] == [0.0, 1.0] and out.timeouts["math_accuracy"] == [0]


def test_custom_rewards_that_raise_overrun_or_report_failures_get_the_fallback():
    from tests import custom_reward_fixture as fx

    rs = RewardSet([{"spec": "tests.custom_reward_fixture:explode_on_bad", "name": "boom", "fallback": -1.0}])
    out = rs.score(["p"] * 3, ["good", "bad", "fine"])  # on_error defaults to fallback
    assert out.raw["boom"] == [1.0, -1.0, 1.0] and out.failures["boom"] == [1] and out.timeouts["boom"] == []

    def reports(prompts, completions, **_):
        return SampleScores([0.9] * len(prompts), failed=[0], timed_out=[2])

    from rewards import register
    register("test_reports_failures")(reports)
    out = RewardSet([{"spec": "test_reports_failures", "name": "r"}]).score(["p"] * 3, ["a", "b", "c"])
    assert out.raw["r"] == [0.0, 0.9, 0.0] and out.failures["r"] == [0, 2] and out.timeouts["r"] == [2]
    assert fx is not None


def test_check_failure_share_names_the_component_in_one_line():
    rs = RewardSet([{"spec": "tests.custom_reward_fixture:explode_on_bad", "name": "boom"},
                    {"spec": "format", "name": "fmt"}])
    out = rs.score(["p"] * 4, ["bad", "bad!", "bad?", "ok"])
    assert out.failures == {"boom": [0, 1, 2], "fmt": []}
    with pytest.raises(RewardError) as e:
        check_failure_share(out, 0.5)
    assert str(e.value).startswith("reward 'boom' failed on 3 of 4 samples") and "\n" not in str(e.value)
    check_failure_share(out, 0.75)  # exactly at the limit is fine
