"""AlpacaEval: metrics come from alpaca_eval's own code (checked against hand formulas and known answers), the LC win
rate runs offline, order randomisation is seeded, and the output files load with alpaca_eval's own readers."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from alpaca_eval import constants as ae_constants
from alpaca_eval import main as ae_main
from alpaca_eval import utils as ae_utils
from alpaca_eval.metrics import glm_winrate

from align.eval.alpacaeval import annotate, compute_metrics, select_positions
from align.eval.judges import LocalModelJudge
from align.eval.run import EvalConfig, run_eval

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "alpaca_eval"
REF = DATA / "gpt4_1106_preview_outputs.json"
N = 805


BETA = 4.0  # strength of the simulated judge's length preference


def p_output_2_wins(std_delta_len):
    """A judge that looks only at length, in the GLM's own form: sigmoid(-BETA * tanh(standardised len_1 - len_2))."""
    return 1 / (1 + np.exp(BETA * np.tanh(std_delta_len)))


def synthetic(pref_fn, seed=0) -> pd.DataFrame:
    """805 annotations where the model's output is usually (about 3 times in 4) longer than the reference's."""
    rng = np.random.default_rng(seed)
    l1 = rng.integers(300, 1500, N)
    l2 = np.maximum(20, l1 + rng.normal(300, 400, N).astype(int))
    return pd.DataFrame({
        "instruction": [f"instruction {i}" for i in range(N)], "output_1": ["r" * n for n in l1],
        "generator_1": "ref", "output_2": ["m" * n for n in l2], "generator_2": "model",
        "preference": pref_fn(l1, l2, rng), "annotator": "synthetic",
    })


def length_only(l1, l2, rng):
    d = (l1 - l2).astype(float)
    return np.where(rng.random(N) < p_output_2_wins(d / d.std(ddof=1)), 2.0, 1.0)


def synthetic_df_gamed(path: Path) -> Path:
    """Stand-in with df_gamed.csv's columns: a verbose and a concise gamed baseline judged by the same length-only
    judge (preference already in [0, 1] there), plus an instruction difficulty per instruction."""
    rng = np.random.default_rng(1)
    rows = []
    for model, shift in (("gamed_verbose", -1.0), ("gamed_concise", 1.0)):
        d = rng.normal(shift, 0.7, N)
        rows.append(pd.DataFrame({"model": model, "index": range(N),
                                  "preference": (rng.random(N) < p_output_2_wins(d)).astype(float),
                                  "std_delta_len": d, "instruction_difficulty": rng.normal(0, 1, N),
                                  "not_gamed_baseline": False}))
    pd.concat(rows).to_csv(path, index=False)
    return path


def test_winrate_matches_hand_formula_and_always_winning_model():
    ann = synthetic(lambda l1, l2, rng: rng.choice([1.0, 1.5, 2.0], N, p=[0.3, 0.1, 0.6]))
    m = compute_metrics(ann)
    p = ann["preference"] - 1
    assert m["win_rate"] == pytest.approx(p.mean() * 100)
    assert m["standard_error"] == pytest.approx(p.std(ddof=1) / np.sqrt(N) * 100)
    assert (m["n_wins"], m["n_wins_base"], m["n_draws"]) == ((p == 1).sum(), (p == 0).sum(), (p == 0.5).sum())

    always = compute_metrics(synthetic(lambda l1, l2, rng: np.full(N, 2.0)))
    assert always["win_rate"] == 100 and always["n_wins"] == N and always["standard_error"] == 0
    assert always["length_controlled_winrate"] > 95


def test_length_driven_preferences_give_lc_near_50_offline(monkeypatch):
    def no_hub(**kwargs):
        raise AssertionError(f"network download attempted: {kwargs}")

    monkeypatch.setattr(glm_winrate, "hf_hub_download", no_hub)
    ann = synthetic(length_only)
    m = compute_metrics(ann, lc_glm="length_controlled_v1")  # no df_gamed anywhere -> alpaca_eval's minimal GLM
    assert m["win_rate"] > 70  # raw win rate rewards verbosity ...
    assert abs(m["length_controlled_winrate"] - 50) < 6  # ... the length-controlled one does not
    assert m["lc_glm"] == "length_controlled_minimal" and "unavailable offline" in m["df_gamed_source"]
    assert "glm_preference" in ann.columns  # alpaca_eval's per-instance GLM prediction, kept in the annotations
    with pytest.raises(AssertionError, match="network download attempted"):  # opting in really calls the hub
        compute_metrics(ann, lc_glm="length_controlled_v1", allow_hub=True)


def test_published_lc_glm_runs_offline_from_local_or_cached_df_gamed(tmp_path, monkeypatch):
    gamed = synthetic_df_gamed(tmp_path / "df_gamed.csv")
    ann = synthetic(length_only)
    m = compute_metrics(ann, lc_glm="length_controlled_v1", df_gamed_path=gamed)
    assert m["lc_glm"] == "length_controlled_v1" and m["df_gamed_source"] == f"local file {gamed}"
    assert m["win_rate"] > 70 and abs(m["length_controlled_winrate"] - 50) < 6

    # The same file sitting in a Hugging Face cache (what an earlier online run leaves behind) is found offline.
    snap = tmp_path / "hf" / "datasets--tatsu-lab--alpaca_eval" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    shutil.copy(gamed, snap / "df_gamed.csv")
    (tmp_path / "hf" / "datasets--tatsu-lab--alpaca_eval" / "refs").mkdir()
    (tmp_path / "hf" / "datasets--tatsu-lab--alpaca_eval" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(ae_constants, "DEFAULT_CACHE_DIR", str(tmp_path / "hf"))
    cached = compute_metrics(synthetic(length_only), lc_glm="length_controlled_v1")
    assert cached["lc_glm"] == "length_controlled_v1" and cached["df_gamed_source"].startswith("Hugging Face cache")
    assert cached["length_controlled_winrate"] == pytest.approx(m["length_controlled_winrate"])


class ModelStub:
    def chat(self, conversations, temperature, max_tokens):
        return [f"MODEL-ANSWER to {c[-1]['content'][:30]}" for c in conversations]


class JudgeStub:
    """A ChatModel acting as judge: prefers whichever shown output is the model's; never answers for one instruction."""

    def __init__(self, bad_instruction):
        self.bad, self.model_first = bad_instruction, {}

    def chat(self, conversations, temperature, max_tokens):
        replies = []
        for conv in conversations:
            user = conv[-1]["content"]
            instruction = re.search(r'"instruction": """(.*?)""",', user, re.S).group(1)
            first = re.search(r'"model_identifier": "m",\s*"output": """(.*?)"""', user, re.S).group(1)
            self.model_first[instruction] = first.startswith("MODEL-ANSWER")
            replies.append("I cannot tell" if instruction == self.bad else "m" if self.model_first[instruction] else "M")
        return replies


def test_run_alpacaeval_files_load_with_alpaca_eval(tmp_path):
    ref = json.loads(REF.read_text())
    positions = select_positions(N, 40)
    # alpaca_eval.main.evaluate's subset: seeded shuffle (random_state=123), first max_instances.
    assert positions == sorted(pd.DataFrame(ref).sample(frac=1, random_state=123).index[:40])
    bad = ref[positions[3]]["instruction"]
    judge_chat = JudgeStub(bad)
    cfg = EvalConfig(model_id="stub-model", output_dir=tmp_path, mtbench={"enabled": False},
                     alpacaeval={"enabled": True, "reference_outputs": REF, "max_instances": 40},
                     judge={"kind": "local", "path": tmp_path})  # judge built below; path unused
    res = run_eval(cfg, chat_model=ModelStub(), judge=LocalModelJudge(judge_chat, name="stub-judge"))["alpaca_eval"]
    out = tmp_path / "alpaca_eval"

    ann = ae_utils.load_or_convert_to_dataframe(out / "annotations.json")
    assert len(ann) == 40 and res["n_failed"] == 1 and res["n_total"] == 39
    assert res["win_rate"] == 100 and res["n_wins"] == 39
    good = ann[ann["instruction"] != bad]
    assert (good["preference"] == 2).all() and ann.loc[ann["instruction"] == bad, "preference"].isna().all()
    assert (ann["generator_1"] == "gpt4_1106_preview").all() and (ann["generator_2"] == "stub-model").all()
    assert ann["output_1"].tolist() == [ref[p]["output"] for p in positions]
    # Order randomised: the judge saw the model first exactly on the switched rows, and both orders occur.
    assert ann["is_switched_outputs"].tolist() == [judge_chat.model_first[i] for i in ann["instruction"]]
    assert 0 < ann["is_switched_outputs"].sum() < 40

    outputs = ae_utils.load_or_convert_to_dataframe(out / "model_outputs.json")
    assert outputs.columns.tolist() == ["dataset", "instruction", "output", "generator"]
    assert outputs["instruction"].tolist() == [ref[p]["instruction"] for p in positions]
    board = ae_utils.load_or_convert_to_dataframe(out / "leaderboard.csv")
    assert board.loc["stub-model", "win_rate"] == 100 and board.loc["stub-model", "n_total"] == 39
    assert "length_controlled_winrate" in board.columns

    # alpaca_eval's own evaluate() recomputes the leaderboard from our annotations.json + leaderboard.csv.
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    df_board, _ = ae_main.evaluate(model_outputs=copy / "model_outputs.json", reference_outputs=REF,
                                   annotators_config=None, precomputed_leaderboard=copy / "leaderboard.csv",
                                   is_recompute_metrics_only=True, fn_metric="get_winrate", output_path=copy,
                                   is_return_instead_of_print=True, sort_by="win_rate")
    assert df_board.loc["stub-model", "win_rate"] == pytest.approx(res["win_rate"])
    assert df_board.loc["stub-model", "n_total"] == 39
    report = (out / "report.md").read_text()
    assert "LC win rate" in report and "length_controlled_minimal" in report


def test_same_seed_same_order_other_seed_other_order():
    ref = json.loads(REF.read_text())[:60]
    model = [{"instruction": r["instruction"], "output": "x", "generator": "m"} for r in ref]
    judge = LocalModelJudge(JudgeStub(bad_instruction=None))
    a = annotate(model, ref, list(range(60)), judge, seed=1)["is_switched_outputs"]
    b = annotate(model, ref, list(range(60)), judge, seed=1)["is_switched_outputs"]
    c = annotate(model, ref, list(range(60)), judge, seed=2)["is_switched_outputs"]
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist()


# --- AlpacaEval 2.0's weighted annotator -------------------------------------------------------------------------

LOGPROB_CASES = [
    {"m": -0.0176, "M": -4.0488, "Both": -14.9},     # confident m
    {"M": -0.02, "m": -3.9, "The": -9.0},            # confident M
    {"m": -0.69, "M": -0.70},                        # nearly even
    {"M": -0.3, "Based": -2.0},                      # m missing: probability 0
    {"m": -1.2},                                     # M missing
]


def as_openai_completion(top: dict[str, float]) -> dict:
    """The completion alpaca_eval's logprob_parser reads (OpenAI chat logprobs, one token)."""
    tops = [{"token": t, "logprob": lp} for t, lp in top.items()]
    return {"logprobs": {"content": [{"token": tops[0]["token"], "logprob": tops[0]["logprob"], "top_logprobs": tops}]}}


@pytest.mark.parametrize("top", LOGPROB_CASES)
def test_weighted_preference_equals_alpaca_evals_logprob_parser(top):
    """weighted_alpaca_eval_gpt4_turbo's completion parser: logprob_parser(numerator m, denominator [m, M],
    is_binarize False); ours must give the same number."""
    from alpaca_eval.completion_parsers import logprob_parser

    from align.eval.alpacaeval import weighted_preference

    want = logprob_parser(as_openai_completion(top), numerator_token="m", denominator_tokens=["m", "M"],
                          is_binarize=False)[0]
    assert weighted_preference(top) == pytest.approx(want, abs=1e-12)
    assert np.isnan(weighted_preference({"Both": -0.1})) and np.isnan(weighted_preference(None))


class LogprobJudge:
    """Returns fixed first-token log-probs: the first output shown gets P(m) = p_first; None for `text_only` rows."""

    name, caveat = "logprob-judge", None

    def __init__(self, p_first: float, text_only: set[str] = frozenset()):
        self.p_first, self.text_only, self.asked = p_first, text_only, []

    def first_token_logprobs(self, requests):
        self.asked += [r.dialogs[0][0]["content"] for r in requests]
        return [None if r.dialogs[0][0]["content"] in self.text_only else
                {"m": float(np.log(self.p_first)), "M": float(np.log(1 - self.p_first))} for r in requests]

    def judge(self, requests):
        return ["M"] * len(requests)   # the text fallback: the second output shown wins


def test_weighted_annotations_flip_with_the_shown_order_and_identical_outputs_draw():
    model = [{"instruction": f"q{i}", "output": "same" if i == 0 else f"model {i}", "generator": "m"} for i in range(6)]
    ref = [{"instruction": f"q{i}", "output": "same" if i == 0 else f"ref {i}", "generator": "r"} for i in range(6)]
    judge = LogprobJudge(p_first=0.8, text_only={"q5"})
    ann = annotate(model, ref, list(range(6)), judge, seed=123)
    assert ann.loc[0, "preference"] == 1.5 and ann.loc[0, "annotation"] == "identical"
    assert "q0" not in judge.asked                                     # a draw is not judged
    for i in range(1, 5):                                              # P(first shown wins) = 0.8
        shown_first_is_model = bool(ann.loc[i, "is_switched_outputs"])
        assert ann.loc[i, "annotation"] == "weighted"
        assert ann.loc[i, "preference"] == pytest.approx(1.2 if not shown_first_is_model else 1.8)
    assert ann.loc[5, "annotation"] == "binarized"                    # no log-probs: the reply text decides
    assert ann.loc[5, "preference"] == (1.0 if ann.loc[5, "is_switched_outputs"] else 2.0)


def test_annotator_label_is_in_every_output(tmp_path):
    from align.eval.alpacaeval import annotator_label, run_alpacaeval

    assert annotator_label(["weighted", "identical"]).startswith("weighted")
    assert annotator_label(["binarized", "identical"]).startswith("binarized")
    assert annotator_label(["weighted", "binarized"]).startswith("mixed: 1 of 2")

    class Chat:
        def chat(self, convs, temperature, max_tokens):
            return [f"answer {i}" for i in range(len(convs))]

    refs = [{"instruction": f"q{i}", "output": "x" * (5 + i % 7), "generator": "ref", "dataset": "d"}
            for i in range(12)]
    path = tmp_path / "ref.json"
    path.write_text(json.dumps(refs))
    res = run_alpacaeval(Chat(), LogprobJudge(0.3), tmp_path / "out", "mine", path, lc_glm="length_controlled_minimal")
    assert res["annotator"].startswith("weighted")
    assert "annotator: weighted" in (tmp_path / "out" / "report.md").read_text()
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["annotator"].startswith("weighted")
    board = pd.read_csv(tmp_path / "out" / "leaderboard.csv")
    assert board["annotator"][0].startswith("weighted") and board["lc_glm"][0] == "length_controlled_minimal"
