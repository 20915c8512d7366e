"""Sandboxed code execution: scores are passed/total asserts; hostile code (tests/hostile/) is
contained, scores 0, and leaves no process, file, connection or leaked secret behind."""

import os
import secrets
import shutil
import socket
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from rewards import RewardError, RewardSet
from rewards.sandbox import Sandbox, SandboxConfig, extract_code, processes_of_uid, split_tests

HOSTILE = Path(__file__).parent / "hostile"
ADD_TESTS = ["assert add(2, 3) == 5", "assert add(-1, 1) == 0"]
ROOT = os.geteuid() == 0
FAST = SandboxConfig(timeout_s=5.0, memory_mb=512)  # generous: the 2 cores are shared and busy

LEGIT = '''
import sys, re, heapq, functools, typing
from collections import namedtuple, Counter
from dataclasses import dataclass, field
from enum import Enum
sys.setrecursionlimit(5000)
P = namedtuple("P", "x y")
class NT(typing.NamedTuple):
    a: int
@dataclass
class D:
    v: int = 0
    w: list = field(default_factory=list)
@functools.lru_cache(None)
def fib(n):
    return n if n < 2 else fib(n - 1) + fib(n - 2)
def solve(n):
    with open("scratch.txt", "w") as f:  # its own work dir is writable
        f.write(str(n))
    extra = P(1, 2).x + NT(1).a + D(1).v + Enum("E", "A B").A.value + Counter("aab")["a"]
    return fib(n) + extra - 6 + len(open("scratch.txt").read()) - len(str(n))
'''


def test_correct_code_scores_one_even_with_stdlib_heavy_code():
    completion = f"Here you go:\n```python\n{LEGIT}\n```\nDone."
    tests = ["assert solve(10) == 55", "assert solve(1) == 1",
             "import os\ndef env():\n    return sorted(os.environ), os.getcwd(), os.environ['HOME']",
             "assert env()[0] == ['HOME', 'LANG', 'PATH', 'TMPDIR']", "assert env()[1] == env()[2]"]
    r = Sandbox(FAST).run(extract_code(completion), tests)
    assert (r.status, r.passed, r.total, r.score) == ("ok", 4, 4, 1.0), r


def test_partial_credit_is_the_fraction_of_asserts():
    code = "def add(a, b):\n    return a + b if a >= 0 else 0\n"
    tests = "import math\nHELPER = 5\nassert add(2, 3) == HELPER\nassert add(-1, 1) == 0\nassert add(-2, -2) == -4\n"
    r = Sandbox(FAST).run(code, tests)
    assert (r.status, r.passed, r.total) == ("ok", 2, 3) and r.score == pytest.approx(2 / 3)
    assert r.detail == "110"  # per-assert outcome, in order


def test_humaneval_check_candidate_counts_each_assert():
    tests = "METADATA = {}\n\ndef check(candidate):\n    assert candidate(1) == 2\n    assert candidate(2) == 4\n" \
            "    for x in range(3):\n        assert candidate(x) == x + 1\n"
    r = Sandbox(FAST).run("def inc(x):\n    return x + 1\n", tests, entry_point="inc")
    assert (r.passed, r.total) == (2, 3)
    with pytest.raises(RewardError, match="no entry_point"):
        split_tests(tests)


def test_load_errors_and_bad_tests():
    assert Sandbox(FAST).run("def add(a, b) return a", ADD_TESTS).status == "load-error"
    assert Sandbox(FAST).run("def other(): pass", ADD_TESTS).score == 0.0
    assert Sandbox(FAST).run("x = 1", ["x == 1"]).status == "no-tests"
    # list items without an assert are setup, not tests
    assert split_tests(["import math", "assert math.pi > 3"]) == [(False, "import math"), (True, "assert math.pi > 3")]
    with pytest.raises(RewardError) as e:
        split_tests("assert f(1) ==\nassert f(2) == 2")
    assert "\n" not in str(e.value) and "SyntaxError line 1" in str(e.value)


def test_extract_code_prefers_the_last_python_block():
    text = "```\nplain\n```\n```python\nfirst = 1\n```\ntext\n```py\nlast = 2\n```"
    assert extract_code(text).strip() == "last = 2"
    assert extract_code("```\nonly = 3\n```").strip() == "only = 3"
    assert extract_code("x = 4") == "x = 4"
    assert extract_code("```python\nunterminated = 5\n").strip() == "unterminated = 5"


@pytest.mark.skipif(not ROOT, reason="counts children by their private uids, which needs root")
def test_samples_run_concurrently_in_a_bounded_pool():
    code = "import time\ntime.sleep(0.8)\ndef f():\n    return 1\n"
    box = Sandbox(SandboxConfig(timeout_s=10, max_workers=2))
    codes = [code] * 4 + ["def f():\n    return 2\n"]
    results, samples = _watch(lambda: box.run_many(codes, [["assert f() == 1"]] * 5))
    assert [r.score for r in results] == [1.0] * 4 + [0.0]  # in input order
    ours = {r.uid for r in results}
    peak = max(len(ours & set(live)) for live in samples)
    assert peak == 2  # two children at a time: concurrent, and bounded by max_workers


# -- the hostile corpus ---------------------------------------------------------------------------
@pytest.fixture
def hostile_env(monkeypatch):
    """A listening socket, paths that must stay absent, a secret in the parent's environment, a
    canary in the trainer's working directory. The outside dir is world-writable (and not under
    /tmp, which inside the sandbox is its own work dir), so only the sandbox keeps attacks out."""
    secret_name, secret_value = "DEEPALIGN_TEST_SECRET", "s3cr3t-" + secrets.token_hex(8)
    monkeypatch.setenv(secret_name, secret_value)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.setblocking(False)
    outside = Path(tempfile.mkdtemp(prefix="deepalign-test-outside-", dir="/var/tmp"))
    outside.chmod(0o777)
    canary = Path.cwd() / f".deepalign-canary-{secrets.token_hex(6)}"
    canary.write_text("canary-" + secrets.token_hex(8))
    canary.chmod(0o644)
    env = {
        "__PORT__": str(listener.getsockname()[1]),
        "__OUTSIDE_PATH__": str(outside / "pwned.txt"),
        "__MARKER_PATH__": f"/var/tmp/deepalign-test-marker-{secrets.token_hex(6)}",
        "__SECRET_NAME__": secret_name,
        "__CANARY_PATH__": str(canary),
        "__MAX_FILES__": "200",
    }
    yield env, listener, secret_value
    listener.close()
    canary.unlink()
    shutil.rmtree(outside, ignore_errors=True)
    Path(env["__MARKER_PATH__"]).unlink(missing_ok=True)


def load_hostile(name: str, env: dict) -> str:
    src = (HOSTILE / name).read_text()
    for key, value in env.items():
        src = src.replace(key, value)
    return src


def assert_contained(r, env, listener, secret):
    assert r.score == 0.0, r
    assert not Path(env["__OUTSIDE_PATH__"]).exists() and not Path(env["__MARKER_PATH__"]).exists()
    with pytest.raises(BlockingIOError):
        listener.accept()  # nothing ever connected
    assert secret not in repr(r)
    if r.uid is not None:
        assert processes_of_uid(r.uid) == []


@pytest.mark.parametrize("name", sorted(p.name for p in HOSTILE.glob("*.py") if p.name != "sleeper.py"))
def test_hostile_code_is_contained_and_scores_zero(name, hostile_env):
    env, listener, secret = hostile_env
    t0 = time.monotonic()
    r = Sandbox(FAST.model_copy(update={"max_files": 200})).run(load_hostile(name, env), ADD_TESTS)
    assert time.monotonic() - t0 < FAST.timeout_s + 5
    assert_contained(r, env, listener, secret)
    assert r.status != "setup-error", r
    expected = {"fork_bomb.py": {"timeout"}, "infinite_loop.py": {"timeout"},
                "memory_bomb.py": {"load-error", "timeout"},
                "exit_early.py": {"crashed"}, "forge_result.py": {"crashed", "protocol-error"},
                "huge_output.py": {"output-limit", "protocol-error"}}
    assert r.status in expected.get(name, {"ok", "load-error", "crashed"}), r


def test_hostile_batch_through_the_code_reward(hostile_env):
    env, listener, secret = hostile_env
    names = ["network.py", "secret_env.py", "kill_parent.py", "write_outside.py", "exit_in_test.py"]
    completions = [f"```python\n{load_hostile(n, env)}\n```" for n in names]
    completions.append("```python\ndef add(a, b):\n    return a + b\n```")
    rs = RewardSet([{"spec": "code", "kwargs": {"sandbox": {"timeout_s": 3}}, "timeout_s": 60}])
    out = rs.score(["q"] * len(completions), completions, tests=[ADD_TESTS] * len(completions))
    assert out.total == [0.0] * len(names) + [1.0]
    assert not Path(env["__MARKER_PATH__"]).exists()
    with pytest.raises(BlockingIOError):
        listener.accept()


# -- each layer on its own ------------------------------------------------------------------------
def _sandbox_snapshot() -> tuple[Counter, Counter]:
    """(live, zombie) process counts per sandbox uid (the private uid range of rewards/sandbox.py)."""
    live, zombie = Counter(), Counter()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        uid = int(fields["Uid"].split()[0])
        if 2_000_000_000 <= uid < 2_100_000_000:
            (zombie if fields["State"].strip().startswith("Z") else live)[uid] += 1
    return live, zombie


def _watch(fn) -> tuple[object, list[Counter]]:
    """Run fn() in a thread and sample the sandbox processes until it returns."""
    result, samples = {}, []
    worker = threading.Thread(target=lambda: result.update(r=fn()))
    worker.start()
    while worker.is_alive():
        samples.append(_sandbox_snapshot()[0])
        time.sleep(0.02)
    return result["r"], samples


@pytest.mark.skipif(not ROOT, reason="RLIMIT_NPROC containment via a private uid needs root")
def test_fork_bomb_is_bounded_by_nproc_without_the_audit_hook():
    cfg = SandboxConfig(timeout_s=3.0, nproc=24, audit_guard=False)
    r, samples = _watch(lambda: Sandbox(cfg).run((HOSTILE / "fork_bomb.py").read_text(), ADD_TESTS))
    peak = max(live[r.uid] for live in samples)
    assert r.status == "timeout" and r.score == 0.0
    assert r.layers["uid"] == str(r.uid) and r.layers["pid"] == "pidns" and r.strong
    assert 2 <= peak <= cfg.nproc  # it did fork, and never beyond the limit
    live, zombie = _sandbox_snapshot()
    assert live[r.uid] == 0 and zombie[r.uid] == 0  # all dead and reaped (PID namespace)


@pytest.mark.skipif(not ROOT, reason="namespaces and the uid switch need root")
def test_namespaces_alone_contain_network_and_writes(hostile_env):
    env, listener, secret = hostile_env
    box = Sandbox(SandboxConfig(timeout_s=3, audit_guard=False))
    for name in ("network.py", "write_outside.py", "secret_env.py", "kill_parent.py"):
        r = box.run(load_hostile(name, env), ADD_TESTS)
        assert r.layers == {"net": "netns", "fs": "tmpfs-root", "pid": "pidns", "user": "userns", "uid": str(r.uid)}
        assert r.score == 0.0, (name, r)
        assert not Path(env["__OUTSIDE_PATH__"]).exists() and not Path(env["__MARKER_PATH__"]).exists()
        assert secret not in repr(r)
    with pytest.raises(BlockingIOError):
        listener.accept()


def test_audit_hook_alone_blocks_network_and_writes(hostile_env):
    env, listener, secret = hostile_env
    box = Sandbox(SandboxConfig(timeout_s=3, isolate_network=False, isolate_fs=False, isolate_processes=False,
                                allow_weak_isolation=True))
    for name in ("network.py", "write_outside.py", "forge_result.py"):
        r = box.run(load_hostile(name, env), ADD_TESTS)
        assert r.layers["net"] == "audit-hook" and r.layers["fs"] == "audit-hook"
        assert_contained(r, env, listener, secret)
