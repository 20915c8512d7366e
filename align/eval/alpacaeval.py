"""AlpacaEval 2.0: the 805 instructions answered by our model, judged pairwise against a reference model's outputs
with alpaca_eval's own judge prompt, order randomisation and metrics (win rate + length-controlled win rate).

Offline LC win rate. alpaca_eval's `get_length_controlled_winrate` always calls `hf_hub_download` for the dataset
file tatsu-lab/alpaca_eval:df_gamed.csv. It reads two things from it: the per-instruction `instruction_difficulty`
(a feature of the length_controlled_v1 and _noreg GLMs) and, for length_controlled_v1 only, the annotations of two
"gamed" baselines it regularises towards (lambda=0.2). We resolve that file without network:
  1. `lc_df_gamed_path` (a local copy of df_gamed.csv)       -> the published GLM, offline;
  2. else the Hugging Face cache (try_to_load_from_cache)     -> the published GLM, offline;
  3. else, if `lc_allow_hub_download`, let alpaca_eval download it (needs the hub);
  4. else alpaca_eval's own "length_controlled_minimal" GLM (length term + intercept, no instruction difficulty, no
     regularisation), which never reads df_gamed; the download call is answered with a zero-difficulty stand-in.
The report always says which GLM ran and where df_gamed came from.
"""

import importlib.resources
import io
import json
import math
import warnings
from pathlib import Path
from unittest import mock

import pandas as pd
from alpaca_eval import constants as ae_constants
from alpaca_eval import utils as ae_utils
from alpaca_eval.metrics import get_length_controlled_winrate, glm_winrate
from alpaca_eval.processors import RandomSwitchTwoColumnsProcessor

from align.eval.errors import EvalError
from align.eval.io import atomic_write_text, read_json_list, write_json
from align.eval.judges import Judge, JudgeRequest
from align.eval.mtbench import judge_with_retries
from align.eval.types import LC_GLMS, ChatModel

JUDGE_PROMPT = "evaluators_configs/alpaca_eval_clf_gpt4_turbo/alpaca_eval_clf.txt"  # AlpacaEval 2.0's prompt
SHUFFLE_SEED = 123  # alpaca_eval.main.evaluate shuffles with this seed before taking max_instances


def load_outputs(path: str | Path, need_output: bool = True) -> list[dict]:
    """A JSON list of {instruction, output, generator, dataset} (alpaca_eval's model_outputs format)."""
    rows = read_json_list(path)
    for i, r in enumerate(rows):
        if not isinstance(r.get("instruction"), str):
            raise EvalError(f"{path}: row {i}: missing string field 'instruction'")
        if need_output and not isinstance(r.get("output"), str):
            raise EvalError(f"{path}: row {i}: missing string field 'output'")
    if not rows:
        raise EvalError(f"{path}: no instructions")
    return rows


def select_positions(n: int, max_instances: int | None) -> list[int]:
    """All positions, or the first `max_instances` of alpaca_eval's seeded shuffle (same subset as its evaluate())."""
    if max_instances is None or max_instances >= n:
        return list(range(n))
    return sorted(pd.RangeIndex(n).to_series().sample(frac=1, random_state=SHUFFLE_SEED).iloc[:max_instances])


def generate_outputs(chat_model: ChatModel, instances: list[dict], generator: str, max_tokens: int,
                     temperature: float = 0.0) -> list[dict]:
    convs = [[{"role": "user", "content": r["instruction"]}] for r in instances]
    outputs = chat_model.chat(convs, temperature, max_tokens)
    if len(outputs) != len(instances):
        raise EvalError(f"chat model returned {len(outputs)} replies for {len(instances)} instructions")
    return [{"dataset": r.get("dataset", "alpaca_eval"), "instruction": r["instruction"], "output": o,
             "generator": generator} for r, o in zip(instances, outputs)]


def judge_template() -> str:
    return importlib.resources.files("alpaca_eval").joinpath(JUDGE_PROMPT).read_text(encoding="utf-8")


def parse_preference(reply: str) -> float:
    """The prompt asks for the bare identifier: 'm' = first output shown, 'M' = second; anything else is NaN."""
    token = reply.strip().strip("\"'`.*")
    return 1.0 if token == "m" else 2.0 if token == "M" else math.nan


def weighted_preference(top_logprobs: dict[str, float] | None) -> float:
    """AlpacaEval 2.0's default annotator (weighted_alpaca_eval_gpt4_turbo): the judge's probability mass on
    the two labels, as a continuous preference in [1, 2] (1 = first output shown, 2 = second):

        p = 2 - P(m) / (P(m) + P(M))      over the first reply token's top log-probs (a missing label has P = 0)

    NaN when neither label is among the top log-probs (then the reply text is parsed instead)."""
    if not top_logprobs:
        return math.nan
    lp_m, lp_big = top_logprobs.get("m", -math.inf), top_logprobs.get("M", -math.inf)
    if lp_m == -math.inf and lp_big == -math.inf:
        return math.nan
    top = max(lp_m, lp_big)
    p_m = math.exp(lp_m - top) / (math.exp(lp_m - top) + math.exp(lp_big - top))
    return 2.0 - p_m


def _flip(df: pd.DataFrame) -> pd.DataFrame:  # preference of a switched row, seen from the unswitched order
    if df.empty or "preference" not in df.columns:
        return df
    return df.assign(preference=3 - df["preference"])


def annotate(model_outputs: list[dict], reference: list[dict], positions: list[int], judge: Judge,
             seed: int = 123, retries: int = 2) -> pd.DataFrame:
    """Pairwise annotations in alpaca_eval's format (output_1 = reference, output_2 = model, preference in [1, 2],
    2 = model wins, NaN = judge reply unparseable after retries). The index is the instruction's position in the
    evaluation set, which alpaca_eval's LC GLM uses to look up instruction difficulty.

    Preference per row, column `annotation`: "weighted" when the judge returned first-token log-probs
    (weighted_preference, AlpacaEval 2.0's default annotator), "binarized" when only its reply text could be
    parsed (m -> 1, M -> 2), "identical" when both outputs are the same string (a draw, 1.5, not judged)."""
    df = pd.DataFrame({
        "dataset": [r.get("dataset", "alpaca_eval") for r in model_outputs],
        "instruction": [r["instruction"] for r in model_outputs],
        "output_1": [r["output"] for r in reference], "generator_1": [r.get("generator", "reference") for r in reference],
        "output_2": [r["output"] for r in model_outputs], "generator_2": [r["generator"] for r in model_outputs],
    }, index=positions)
    # alpaca_eval's PairwiseAnnotator randomises the shown order exactly like this (seeded on the instruction).
    switch = RandomSwitchTwoColumnsProcessor(two_columns_to_switch=["output_1", "output_2"], fn_replace_if_switch=_flip,
                                             random_seed_columns=["instruction"], _switch_column="is_switched_outputs",
                                             seed=seed)
    shown = switch.preprocess(df)
    prompts, _ = ae_utils.make_prompts(shown, judge_template())
    requests = []
    for prompt, (_, row) in zip(prompts, shown.iterrows()):
        msgs = ae_utils.prompt_to_chatml(prompt)
        system = "\n".join(m["content"] for m in msgs if m["role"] == "system")
        user = "\n".join(m["content"] for m in msgs if m["role"] == "user")
        dialogs = tuple([{"role": "user", "content": row["instruction"]}, {"role": "assistant", "content": row[c]}]
                        for c in ("output_1", "output_2"))
        requests.append(JudgeRequest(system, user, "alpaca", dialogs))
    same = (shown["output_1"] == shown["output_2"]).tolist()
    pending = [i for i in range(len(requests)) if not same[i]]
    preference, how, raw = [1.5] * len(requests), ["identical"] * len(requests), [""] * len(requests)
    logprobs = judge.first_token_logprobs([requests[i] for i in pending]) if pending else []
    text_only = []
    for i, top in zip(pending, logprobs):
        p = weighted_preference(top)
        if math.isnan(p):
            text_only.append(i)
        else:
            preference[i], how[i], raw[i] = p, "weighted", json.dumps(top)
    results = judge_with_retries(judge, [requests[i] for i in text_only], parse_preference, math.isnan, retries)
    for i, (p, reply) in zip(text_only, results):
        preference[i], how[i], raw[i] = p, "binarized", reply
    shown["preference"], shown["annotation"], shown["raw_completion"] = preference, how, raw
    was_switched = shown["is_switched_outputs"].astype(bool)
    out = switch.postprocess(shown)
    out["is_switched_outputs"] = was_switched
    out["annotator"] = judge.name
    return out


def _df_gamed_source(glm: str, df_gamed_path: str | Path | None, allow_hub: bool) -> tuple[str, str | None, str]:
    """-> (glm actually used, local df_gamed.csv path or None, human-readable source)."""
    if glm not in LC_GLMS:
        raise EvalError(f"alpacaeval.lc_glm: expected one of {LC_GLMS}, got {glm!r}")
    if glm == "length_controlled_minimal":
        return glm, None, "not needed (length_controlled_minimal)"
    if df_gamed_path is not None:
        if not Path(df_gamed_path).is_file():
            raise EvalError(f"alpacaeval.lc_df_gamed_path: {df_gamed_path} not found")
        return glm, str(df_gamed_path), f"local file {df_gamed_path}"
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache("tatsu-lab/alpaca_eval", "df_gamed.csv", repo_type="dataset",
                                    cache_dir=ae_constants.DEFAULT_CACHE_DIR)
    if isinstance(cached, str):
        return glm, cached, f"Hugging Face cache {cached}"
    if allow_hub:
        return glm, None, "downloaded from the Hugging Face hub (tatsu-lab/alpaca_eval)"
    return ("length_controlled_minimal", None,
            f"unavailable offline (no lc_df_gamed_path, not in the HF cache), so length_controlled_minimal ran "
            f"instead of {glm}")


def compute_metrics(annotations: pd.DataFrame, lc_glm: str = "length_controlled_v1",
                    df_gamed_path: str | Path | None = None, allow_hub: bool = False) -> dict:
    """alpaca_eval's win rate (+ standard error) and LC win rate, computed by alpaca_eval's own code.
    Adds alpaca_eval's `glm_preference` column to `annotations` in place."""
    if annotations["preference"].notna().sum() == 0:
        raise EvalError("AlpacaEval: no judgment could be parsed (all preferences missing); check the judge")
    glm, path, source = _df_gamed_source(lc_glm, df_gamed_path, allow_hub)
    if glm == "length_controlled_minimal":  # the formula ignores instruction_difficulty: a zero stand-in suffices
        n = int(annotations.index.max()) + 1
        stand_in = pd.DataFrame({"model": "none", "index": range(n), "instruction_difficulty": 0.0}).to_csv(index=False)
        fake_download = lambda **_: io.StringIO(stand_in)  # noqa: E731
    elif path is not None:
        fake_download = lambda **_: path  # noqa: E731
    else:
        fake_download = glm_winrate.hf_hub_download  # the real download
    with mock.patch.object(glm_winrate, "hf_hub_download", fake_download), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # sklearn deprecations inside alpaca_eval's GLM fit
        try:
            metrics = get_length_controlled_winrate(annotations, glm_name=glm, save_weights_dir=None)
        except KeyError as e:
            raise EvalError(f"LC win rate: instruction position {e} is not in df_gamed.csv; {glm} needs the "
                            f"standard 805 AlpacaEval instructions in their original order") from None
    out = {k: (v.item() if hasattr(v, "item") else v) for k, v in metrics.items()}
    out.update(lc_glm=glm, df_gamed_source=source)
    return out


def run_alpacaeval(chat_model: ChatModel, judge: Judge, out_dir: str | Path, generator: str,
                   reference_outputs: str | Path, data_path: str | Path | None = None,
                   max_instances: int | None = None, max_tokens: int = 2048, temperature: float = 0.0,
                   seed: int = 123, judge_retries: int = 2, lc_glm: str = "length_controlled_v1",
                   lc_df_gamed_path: str | Path | None = None, lc_allow_hub_download: bool = False) -> dict:
    """Writes model_outputs.json, annotations.json, leaderboard.csv (alpaca_eval's formats) and report.md."""
    out_dir = Path(out_dir)
    reference = load_outputs(reference_outputs)
    if data_path is None:
        data = reference
    else:
        data = load_outputs(data_path, need_output=False)
        by_instruction = {r["instruction"]: r for r in reference}
        missing = [i for i, r in enumerate(data) if r["instruction"] not in by_instruction]
        if missing:
            raise EvalError(f"{reference_outputs}: no reference output for {len(missing)} instruction(s) of "
                            f"{data_path}, first at row {missing[0]}")
        reference = [by_instruction[r["instruction"]] for r in data]
    positions = select_positions(len(data), max_instances)

    model_outputs = generate_outputs(chat_model, [data[p] for p in positions], generator, max_tokens, temperature)
    write_json(out_dir / "model_outputs.json", model_outputs)
    annotations = annotate(model_outputs, [reference[p] for p in positions], positions, judge, seed, judge_retries)
    metrics = compute_metrics(annotations, lc_glm, lc_df_gamed_path, lc_allow_hub_download)
    atomic_write_text(out_dir / "annotations.json", annotations.to_json(orient="records", indent=2))

    row = {k: metrics[k] for k in ("win_rate", "standard_error", "n_wins", "n_wins_base", "n_draws", "n_total",
                                   "discrete_win_rate")}
    annotator = annotator_label(annotations["annotation"].tolist())
    row.update(mode="community", avg_length=int(pd.Series([o["output"] for o in model_outputs]).str.len().mean()),
               length_controlled_winrate=metrics["length_controlled_winrate"],
               lc_standard_error=metrics["lc_standard_error"], annotator=annotator, lc_glm=metrics["lc_glm"])
    atomic_write_text(out_dir / "leaderboard.csv", pd.DataFrame.from_dict({generator: row}, orient="index").to_csv())

    n_failed = int(annotations["preference"].isna().sum())
    result = {**metrics, "avg_length": row["avg_length"], "generator": generator,
              "reference": reference[positions[0]].get("generator", "reference"), "judge": judge.name,
              "caveat": judge.caveat, "n_instances": len(positions), "n_failed": n_failed, "annotator": annotator}
    write_json(out_dir / "metrics.json", result)
    atomic_write_text(out_dir / "report.md", alpacaeval_markdown(result))
    return result


def annotator_label(kinds: list[str]) -> str:
    """How the preferences were obtained, for every output: AlpacaEval 2.0's weighted annotator, the binarized
    variant (reply text only), or a mix; identical-output draws are not counted either way."""
    judged = [k for k in kinds if k != "identical"]
    n_weighted = sum(k == "weighted" for k in judged)
    if judged and n_weighted == len(judged):
        return "weighted (first-token log-probs, as weighted_alpaca_eval_gpt4_turbo)"
    if n_weighted == 0:
        return "binarized (reply text m/M; not AlpacaEval 2.0's weighted default)"
    return f"mixed: {n_weighted} of {len(judged)} weighted, the rest binarized"


def alpacaeval_markdown(r: dict) -> str:
    lines = ["# AlpacaEval", ""]
    if r.get("caveat"):
        lines += [f"**{r['caveat']}**", ""]
    lines += [
        f"- model: `{r['generator']}` vs reference `{r['reference']}`, judge `{r['judge']}` (alpaca_eval 2.0 prompt)",
        f"- instances: {r['n_instances']}  judged: {r['n_total']}  failed (unparseable after retries, excluded): "
        f"{r['n_failed']}  avg length: {r['avg_length']}",
        f"- annotator: {r.get('annotator', 'binarized')}",
        f"- LC GLM: {r['lc_glm']}; df_gamed.csv: {r['df_gamed_source']}",
        "",
        f"**LC win rate: {r['length_controlled_winrate']:.2f} ± {r['lc_standard_error']:.2f}**  ",
        f"**Win rate: {r['win_rate']:.2f} ± {r['standard_error']:.2f}** (wins {r['n_wins']}, losses "
        f"{r['n_wins_base']}, draws {r['n_draws']})",
        "",
    ]
    return "\n".join(lines)
