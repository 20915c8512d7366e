"""Registry (names, dotted paths, one-line errors) and RewardSet (weights, running z-score,
failure policy, timeouts, output validation, checkpointed statistics)."""

import asyncio
import statistics
import time

import pytest

from rewards import RewardComponent, RewardError, RewardSet, RewardSpecError, register, registered, resolve
from rewards.combine import RunningMeanStd
from tests import custom_reward_fixture as fx

FIX = "tests.custom_reward_fixture"


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg.strip() == msg and msg
    return msg


# -- registry -------------------------------------------------------------------------------------
def test_builtins_are_registered_by_name():
    names = registered()
    for name in ("math_accuracy", "exact_match", "format", "length_penalty", "code", "remote", "reward_model"):
        assert name in names
    from rewards.rule import format_reward

    assert resolve("format") is format_reward


def test_register_and_resolve_custom_name():
    @register("test_constant_reward")
    def constant(prompts, completions, **_):
        return [0.25] * len(prompts)

    assert resolve("test_constant_reward") is constant
    with pytest.raises(RewardSpecError, match="already registered"):
        register("test_constant_reward")(lambda p, c, **_: [0.0] * len(p))


@pytest.mark.parametrize("spec, needle", [
    ("no_such_reward", "unknown reward 'no_such_reward'"),
    ("tests.no_such_module_xyz:fn", "cannot import 'tests.no_such_module_xyz'"),
    (f"{FIX}:missing_fn", "has no attribute 'missing_fn'"),
    (f"{FIX}:NOT_CALLABLE", "int object is not callable"),
    ("nocolon:", "must look like"),
])
def test_resolve_errors_are_one_line_and_name_the_spec(spec, needle):
    with pytest.raises(RewardSpecError) as e:
        resolve(spec)
    msg = one_line(e)
    assert needle in msg and spec.split(":")[0] in msg


def test_custom_reward_by_dotted_path_gets_the_extra_columns():
    fx.CALLS.clear()
    rs = RewardSet([{"spec": f"{FIX}:keyword_overlap", "kwargs": {"bonus": 0.5}}])
    out = rs.score(["p1", "p2"], ["red apple", "blue sky"], keywords=[["red", "apple"], ["sky", "sea"]],
                   answer=["x", "y"])
    assert out.raw[f"{FIX}:keyword_overlap"] == [1.5, 1.0]
    assert fx.CALLS == [{"prompts": ["p1", "p2"], "keywords": [["red", "apple"], ["sky", "sea"]],
                         "columns": ["answer"]}]


def test_class_spec_is_built_once_with_kwargs():
    rs = RewardSet([{"spec": f"{FIX}:Scaled", "kwargs": {"factor": 3.0}}])
    assert rs.score(["a", "b"], ["xy", "xyz"]).total == [6.0, 9.0]


# -- combination ----------------------------------------------------------------------------------
def test_weights_and_running_zscore_match_hand_computation():
    comps = [
        RewardComponent(spec=f"{FIX}:keyword_overlap", name="kw", weight=2.0),
        RewardComponent(spec=f"{FIX}:async_length", name="len", weight=0.5, normalize="zscore-running"),
    ]
    rs = RewardSet(comps)
    b1 = (["p"] * 3, ["ab", "abcd", "abcdef"], [["a"], ["zz"], ["b", "q"]])
    out1 = rs.score(b1[0], b1[1], keywords=b1[2])
    history = [2.0, 4.0, 6.0]
    mu, sd = statistics.fmean(history), statistics.pstdev(history)
    z1 = [(x - mu) / sd for x in history]
    assert out1.scaled["len"] == pytest.approx(z1, abs=1e-6)
    assert out1.total == pytest.approx([2 * k + 0.5 * z for k, z in zip([1.0, 0.0, 0.5], z1)], abs=1e-6)
    assert out1.metrics["rewards/len/mean"] == pytest.approx(4.0)
    assert out1.metrics["rewards/kw/std"] == pytest.approx(statistics.pstdev([1.0, 0.0, 0.5]))
    assert out1.metrics["rewards/total/mean"] == pytest.approx(statistics.fmean(out1.total))

    saved = rs.state_dict()
    out2 = rs.score(["p"], ["abcdefghij"], keywords=[["x"]])
    history.append(10.0)
    z2 = (10.0 - statistics.fmean(history)) / statistics.pstdev(history)
    assert out2.scaled["len"] == pytest.approx([z2], abs=1e-6)
    assert out2.total == pytest.approx([0.5 * z2], abs=1e-6)

    # A resumed run restores the running statistics and continues identically.
    resumed = RewardSet(comps)
    resumed.load_state_dict(saved)
    assert resumed.score(["p"], ["abcdefghij"], keywords=[["x"]]).scaled["len"] == pytest.approx([z2], abs=1e-6)
    fresh = RewardSet(comps).score(["p"], ["abcdefghij"], keywords=[["x"]]).scaled["len"]
    assert fresh == [0.0]  # no history: a single sample is its own mean


def test_running_mean_std_merges_batches_exactly():
    rms, data = RunningMeanStd(), [3.0, -1.0, 2.5, 8.0, 0.0, 4.0, 4.0]
    for chunk in (data[:2], data[2:3], data[3:]):
        rms.update(chunk)
    assert rms.mean == pytest.approx(statistics.fmean(data))
    assert rms.std == pytest.approx(statistics.pstdev(data))
    clone = RunningMeanStd()
    clone.load_state_dict(rms.state_dict())
    assert (clone.count, clone.mean, clone.std) == (rms.count, rms.mean, rms.std)


# -- failures -------------------------------------------------------------------------------------
def test_raise_is_one_line_error_naming_function_and_sample():
    rs = RewardSet([{"spec": f"{FIX}:explode_on_bad", "on_error": "raise"}])
    with pytest.raises(RewardError) as e:
        rs.score(["a", "b", "c"], ["fine", "ok", "bad one"])
    msg = one_line(e)
    assert "explode_on_bad" in msg and "sample 2" in msg and "ValueError: cannot score this sample" in msg


def test_sync_timeout_fails_the_batch_without_retrying_it():
    # A sync function that overruns is not retried per sample (each retry would leak a hung thread):
    # the whole call fails, counts as timeouts, and with on_error="raise" says so in one line.
    rs = RewardSet([{"spec": f"{FIX}:hang_on_slow", "name": "slow", "timeout_s": 0.3}])
    t0 = time.monotonic()
    out = rs.score(["a", "b"], ["quick", "slow"])
    assert time.monotonic() - t0 < 1.0  # one timeout, not one per sample
    assert out.failures["slow"] == out.timeouts["slow"] == [0, 1] and out.raw["slow"] == [0.0, 0.0]
    assert out.metrics["rewards/slow/timeouts"] == 2.0 and out.metrics["rewards/slow/failures"] == 2.0
    rs = RewardSet([{"spec": f"{FIX}:hang_on_slow", "timeout_s": 0.3, "on_error": "raise"}])
    with pytest.raises(RewardError) as e:
        rs.score(["a", "b"], ["quick", "slow"])
    msg = one_line(e)
    assert "hang_on_slow" in msg and "no result within 0.3s" in msg


def test_async_timeout_with_fallback():
    rs = RewardSet([{"spec": f"{FIX}:async_hang_on_slow", "timeout_s": 0.2, "on_error": "fallback",
                     "fallback": -1.0}])
    out = rs.score(["a", "b", "c"], ["slow", "x", "y"])
    assert out.raw[f"{FIX}:async_hang_on_slow"] == [-1.0, 2.0, 2.0]
    assert out.failures[f"{FIX}:async_hang_on_slow"] == [0]


def test_fallback_gets_only_failing_samples_and_failures_are_counted():
    comps = [{"spec": f"{FIX}:explode_on_bad", "name": "boom", "on_error": "fallback", "fallback": -1.0,
              "weight": 2.0}]
    rs = RewardSet(comps)
    out = rs.score(["p"] * 4, ["good", "bad", "fine", "bad!"])
    assert out.raw["boom"] == [1.0, -1.0, 1.0, -1.0]
    assert out.total == [2.0, -2.0, 2.0, -2.0]
    assert out.failures["boom"] == [1, 3]
    assert out.metrics["rewards/boom/failures"] == 2.0
    rs.score(["p"], ["bad"])
    assert rs.state_dict()["failure_totals"]["boom"] == 3


def test_fallback_under_zscore_is_excluded_from_statistics():
    rs = RewardSet([{"spec": f"{FIX}:none_for_empty", "name": "n", "normalize": "zscore-running",
                     "on_error": "fallback", "fallback": 0.0}])
    out = rs.score(["p"] * 3, ["a", "", "b"])
    assert out.failures["n"] == [1]
    assert rs.stats["n"].count == 2 and out.scaled["n"] == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("fn, needle", [
    ("wrong_length", "returned 2 scores for 1 samples"),  # localised: sample 0 alone fails too
    ("none_for_empty", "score 0 is NoneType"),
])
def test_bad_return_values_are_rejected(fn, needle):
    rs = RewardSet([{"spec": f"{FIX}:{fn}", "on_error": "raise"}])
    with pytest.raises(RewardError) as e:
        rs.score(["p", "q"], ["x", ""])
    msg = one_line(e)
    assert fn in msg and needle in msg


def test_bad_inputs_and_configs():
    rs = RewardSet([{"spec": "format"}])
    with pytest.raises(RewardError, match="column 'answer' must be a list of 2"):
        rs.score(["a", "b"], ["x", "y"], answer=["only one"])
    with pytest.raises(RewardSpecError, match="duplicate"):
        RewardSet([{"spec": "format"}, {"spec": "format"}])
    with pytest.raises(ValueError, match="extra"):
        RewardComponent(spec="format", wieght=2)
    with pytest.raises(RewardError, match="clash"):
        RewardSet([{"spec": "exact_match", "kwargs": {"answer": ["x"]}}]).score(["p"], ["x"], answer=["x"])


def test_ascore_inside_event_loop_and_score_refuses_there():
    rs = RewardSet([{"spec": f"{FIX}:async_length"}, {"spec": "length_penalty", "kwargs": {"target": 2}}])

    async def main():
        with pytest.raises(RewardError, match="ascore"):
            rs.score(["p"], ["abcd"])
        return await rs.ascore(["p"], ["abcd"])

    out = asyncio.run(main())
    assert out.raw[f"{FIX}:async_length"] == [4.0] and out.raw["length_penalty"] == [-1.0]


def test_where_scopes_a_component_to_its_rows():
    """A component with `where` scores only its rows: others get 0, are not sent to it, and stay out of
    its running normaliser (z-scores computed over its own rows alone)."""
    seen = []

    def length(prompts, completions, **_):
        seen.append(list(prompts))
        return [float(len(c)) for c in completions]

    rs = RewardSet([RewardComponent(spec="tests.grpo_fixture:brevity", name="brev", weight=1.0),
                    RewardComponent(spec="tests.grpo_fixture:brevity", name="len", normalize="zscore-running",
                                    where={"data_source": ["chat"]})])
    rs._fns[1] = (length, {})
    out = rs.score(["a", "b", "c", "d"], ["x", "yyy", "zz", "w" * 50], data_source=["chat", "math", "chat", "math"])
    assert seen == [["a", "c"]]                                   # only the chat rows reach it
    assert out.raw["len"] == [1.0, 0.0, 2.0, 0.0]
    assert out.scaled["len"] == pytest.approx([-1.0, 0.0, 1.0, 0.0], abs=1e-6)   # z over {1, 2} only
    assert out.metrics["rewards/len/scored"] == 2.0
    brev = [1 - min(len(c), 40) / 40 for c in ["x", "yyy", "zz", "w" * 50]]
    assert out.total == pytest.approx([b + s for b, s in zip(brev, [-1.0, 0.0, 1.0, 0.0])])
    with pytest.raises(RewardError, match="where.*'kind'"):
        RewardSet([RewardComponent(spec="tests.grpo_fixture:brevity", where={"kind": ["harmful"]})]).score(
            ["a"], ["b"], data_source=["chat"])
