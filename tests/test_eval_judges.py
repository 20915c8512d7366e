"""Judges: the OpenAI-compatible client against a real local HTTP server (retries, backoff, timeouts, auth, order under
concurrency) and the reward-model judge on a tiny random reward model (verdicts follow its scores; reports carry the
not-comparable label)."""

import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from align.eval.errors import EvalError, JudgeAPIError
from align.eval.judges import REWARD_MODEL_CAVEAT, JudgeRequest, LocalModelJudge, OpenAIJudge, RewardModelJudge
from align.eval.mtbench import parse_pair, parse_rating
from align.eval.run import EvalConfig, run_eval

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mt_bench"


class Server:
    """POST /v1/chat/completions; `behaviour(n, body) -> (status, content, delay_s)` for the n-th request."""

    def __init__(self, behaviour):
        self.n, self.lock, self.auth = 0, threading.Lock(), []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.n += 1
                    n = outer.n
                    outer.auth.append(self.headers.get("Authorization"))
                status, content, delay = behaviour(n, body)
                time.sleep(delay)
                payload = json.dumps({"choices": [{"message": {"content": content}}]}).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # client gave up (timeout test)
                    pass

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def echo(n, body):
    return 200, "echo: " + body["messages"][1]["content"], 0.0


def test_openai_judge_retries_5xx_then_succeeds_and_sends_key(monkeypatch):
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-abc")
    with Server(lambda n, b: (503, "", 0.0) if n <= 2 else echo(n, b)) as srv:
        judge = OpenAIJudge(srv.url, "gpt-x", api_key_env="MY_JUDGE_KEY", backoff_s=0.01)
        assert judge.complete("sys", "hello") == "echo: hello"
        assert srv.n == 3 and srv.auth == ["Bearer sk-abc"] * 3


def test_openai_judge_gives_up_and_does_not_retry_client_errors():
    with Server(lambda n, b: (500, "", 0.0)) as srv:
        with pytest.raises(JudgeAPIError, match="gave up after 3 attempts"):
            OpenAIJudge(srv.url, "gpt-x", max_retries=2, backoff_s=0.01).complete("s", "u")
        assert srv.n == 3
    with Server(lambda n, b: (401, "bad key", 0.0)) as srv:
        with pytest.raises(JudgeAPIError, match="HTTP 401"):
            OpenAIJudge(srv.url, "gpt-x", max_retries=5, backoff_s=0.01).complete("s", "u")
        assert srv.n == 1


def test_openai_judge_timeout_is_retried():
    with Server(lambda n, b: (200, "slow", 1.0) if n == 1 else (200, "fast", 0.0)) as srv:
        judge = OpenAIJudge(srv.url, "gpt-x", timeout_s=0.3, backoff_s=0.01)
        assert judge.complete("s", "u") == "fast" and srv.n == 2


def test_openai_judge_concurrent_batch_keeps_order():
    with Server(lambda n, b: (200, "echo: " + b["messages"][1]["content"], 0.05 * (n % 3))) as srv:
        judge = OpenAIJudge(srv.url, "gpt-x", concurrency=4)
        reqs = [JudgeRequest("s", f"q{i}", "rating") for i in range(12)]
        assert judge.judge(reqs) == [f"echo: q{i}" for i in range(12)]


def test_missing_api_key_env_is_a_user_error(monkeypatch):
    monkeypatch.delenv("NOPE_KEY", raising=False)
    with pytest.raises(EvalError, match="NOPE_KEY is not set"):
        OpenAIJudge("http://127.0.0.1:9/v1", "m", api_key_env="NOPE_KEY")


def test_local_model_judge_sends_system_and_user_greedy():
    class Recorder:
        def chat(self, conversations, temperature, max_tokens):
            self.seen = (conversations, temperature, max_tokens)
            return ["Rating: [[4]]"] * len(conversations)

    rec = Recorder()
    out = LocalModelJudge(rec, max_tokens=99).judge([JudgeRequest("S", "U", "rating")])
    assert out == ["Rating: [[4]]"]
    assert rec.seen == ([[{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]], 0.0, 99)


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("rm")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["a helpful answer", "a harmful answer", "write a poem about the sea"],
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    fast.save_pretrained(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=fast.eos_token_id)
    LlamaForSequenceClassification(cfg).save_pretrained(path)
    return path


def test_reward_model_judge_verdicts_follow_rewards(tiny_rm):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    judge = RewardModelJudge(tiny_rm, scale=0.01, batch_size=2)
    dialogs = [[{"role": "user", "content": "write a poem"}, {"role": "assistant", "content": t}]
               for t in ("a helpful answer", "a harmful answer about the sea", "sea")]
    # Oracle: the reward model run directly, one unpadded dialog at a time.
    tok, model = AutoTokenizer.from_pretrained(tiny_rm), AutoModelForSequenceClassification.from_pretrained(tiny_rm)
    with torch.no_grad():
        r = [model(**tok(tok.apply_chat_template(d, tokenize=False), add_special_tokens=False,
                         return_tensors="pt")).logits[0, 0].item() for d in dialogs]
    assert judge.score(dialogs) == pytest.approx(r, abs=1e-4)  # batching/padding does not change rewards

    reqs = [JudgeRequest("", "", "rating", (d,)) for d in dialogs]
    reqs += [JudgeRequest("", "", "pair", (dialogs[0], dialogs[1])), JudgeRequest("", "", "alpaca", (dialogs[1], dialogs[2]))]
    replies = judge.judge(reqs)
    for d_reward, reply in zip(r, replies[:3]):
        assert parse_rating(reply) == round(1 + 9 / (1 + math.exp(-d_reward / 0.01)))
        assert REWARD_MODEL_CAVEAT in reply
    assert parse_pair(replies[3]) == ("A" if r[0] > r[1] else "B")
    assert replies[4] == ("m" if r[1] >= r[2] else "M")
    with pytest.raises(EvalError, match="scores dialogs"):
        judge.complete("s", "u")


def test_reward_model_reports_are_labelled(tiny_rm, tmp_path):
    class Stub:
        def chat(self, conversations, temperature, max_tokens):
            return ["a helpful answer"] * len(conversations)

    cfg = EvalConfig(model_id="stub", output_dir=tmp_path, mtbench={"data_dir": DATA, "max_questions": 3},
                     judge={"kind": "reward_model", "path": tiny_rm})
    res = run_eval(cfg, chat_model=Stub())
    assert res["caveat"] == REWARD_MODEL_CAVEAT and res["mt_bench"]["n_failed"] == 0
    for report in ("summary.md", "mt_bench/report.md"):
        assert REWARD_MODEL_CAVEAT in (tmp_path / report).read_text()


def test_openai_judge_first_token_logprobs_as_alpaca_eval_asks_for_them():
    """weighted_alpaca_eval_gpt4_turbo's request (1 token, temperature 1, top 5 log-probs); an endpoint that returns
    no log-probs gives None, so the caller falls back to the reply text."""
    import httpx

    sent = []

    def handler(request):
        body = json.loads(request.content)
        sent.append(body)
        choice = {"message": {"content": "m"}}
        if "nolp" not in body["messages"][1]["content"]:
            choice["logprobs"] = {"content": [{"token": "m", "logprob": -0.1, "top_logprobs": [
                {"token": "m", "logprob": -0.1}, {"token": "M", "logprob": -2.4}]}]}
        return httpx.Response(200, json={"choices": [choice]})

    judge = OpenAIJudge("http://judge.test/v1", "gpt-x", concurrency=2)
    judge._client = httpx.Client(base_url="http://judge.test/v1", transport=httpx.MockTransport(handler))
    got = judge.first_token_logprobs([JudgeRequest("s", "u1", "alpaca"), JudgeRequest("s", "nolp", "alpaca")])
    assert got == [{"m": -0.1, "M": -2.4}, None]
    assert all(b["max_tokens"] == 1 and b["temperature"] == 1.0 and b["logprobs"] is True and b["top_logprobs"] == 5
               for b in sent)
    judge.logprobs = False
    assert judge.first_token_logprobs([JudgeRequest("s", "u1", "alpaca")]) == [None]
