"""Run untrusted model-written Python against unit tests, contained, and judge the results here.

Parent side. Each sample runs in a fresh `python -I -S -B rewards/sandbox_child.py` process (see that
file and sandbox_ns.py for the isolation layers, all set up before the untrusted code is compiled)
in its own session, with an environment holding only PATH and LANG, so secrets in os.environ are
never visible. The tests are first rewritten by rewards/checker.py: the sandbox only evaluates the
parts of each assertion that need the candidate and sends them back as plain data; the verdicts are
computed here, by the trusted checker, so nothing the candidate's process says is believed.

We deliberately do NOT use Popen(preexec_fn=...): it is unsafe with threads (this runs inside Ray
workers and a thread pool) and disables vfork. The child sets its own limits before running code.

Deadlines and clean-up never depend on the candidate: the child's watcher kills the whole PID
namespace at its own deadline or when the "lifeline" pipe, whose write end only this process holds,
reaches EOF (this process died, whichever thread started the child); here we kill the child's
process group after our own deadline and, as root, every process of the run's fresh uid. At most
`max_workers` children run at once per process, even if a caller stopped waiting for an earlier
batch: every run holds a slot of a process-wide semaphore.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import re
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from rewards.checker import TestPlan, judge, plan_tests
from rewards.errors import RewardError

CHILD = str(Path(__file__).with_name("sandbox_child.py"))
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_UID_BASE, _UID_SPAN = 2_000_000_000, 100_000_000  # far from system and subuid ranges
STRONG = {"net": "netns", "fs": "tmpfs-root", "pid": "pidns", "user": "userns"}
# Test-only switches that turn one defence off, so the tests can show each attack works without
# it (positive controls): "checker" (judge in the candidate's process, as before), "lifeline".
TEST_ONLY_DISABLED: set[str] = set()
_log = logging.getLogger(__name__)
_weak_logged = False
_slots: dict[int, threading.BoundedSemaphore] = {}
_slots_lock = threading.Lock()


class SandboxConfig(BaseModel):
    """Limits for ONE sample (they apply to the child process, not to the batch)."""

    model_config = ConfigDict(extra="forbid")
    timeout_s: float = Field(10.0, gt=0, description="wall clock per sample, incl. interpreter start")
    memory_mb: int = Field(1024, ge=64, description="RLIMIT_AS (virtual memory)")
    file_mb: int = Field(16, ge=1, description="RLIMIT_FSIZE (one file)")
    disk_mb: int = Field(32, ge=1, description="size of the work dir's private tmpfs (all files)")
    max_files: int = Field(512, ge=8, description="files and dirs the work dir's tmpfs may hold")
    nproc: int = Field(64, ge=1, description="RLIMIT_NPROC inside the sandbox")
    nofile: int = Field(64, ge=16)
    max_workers: int = Field(2, ge=1, description="samples run concurrently (the machine has 2 cores)")
    max_output_bytes: int = Field(1 << 20, ge=1024, description="result-pipe bytes before the run is killed")
    isolate_network: bool = True  # network namespace
    isolate_fs: bool = True  # mount namespace with the private read-only root and tmpfs work dir
    isolate_processes: bool = True  # PID namespace: everything dies (and is reaped) with the run
    drop_privileges: bool = True  # as root: the run's uid outside its namespace is a fresh one
    audit_guard: bool = True  # in-process audit hook layer (defence in depth)
    allow_weak_isolation: bool = Field(False, description="run even where the namespaces are unavailable "
                                       "(or switched off), with the audit hook as the only layer")
    python: str | None = None  # interpreter for the child; default: this one


@dataclass
class SandboxResult:
    status: str  # ok | load-error | no-tests | timeout | crashed | output-limit | protocol-error | setup-error
    passed: int = 0
    total: int = 0
    elapsed_s: float = 0.0
    layers: dict[str, str] = field(default_factory=dict)  # which isolation layers were active
    uid: int | None = None
    detail: str = ""

    @property
    def score(self) -> float:
        return self.passed / self.total if self.status == "ok" and self.total else 0.0

    @property
    def strong(self) -> bool:
        return all(self.layers.get(k) == v for k, v in STRONG.items())


def extract_code(completion: str) -> str:
    """The last ```python (or ```py) block; else the last fenced block; else the whole text."""
    blocks = _FENCE.findall(completion)
    if not blocks:
        return completion
    py = [body for lang, body in blocks if lang.lower() in ("python", "py", "python3")]
    return (py or [body for _, body in blocks])[-1]


def split_tests(tests: str | list[str], entry_point: str | None = None) -> list[tuple[bool, str]]:
    """Tests -> [(is_test, source)], one item per top-level statement; is_test if it asserts.

    A list is one item per element (e.g. MBPP's test_list). A HumanEval-style `def check(candidate)` with no
    top-level asserts is unrolled so each of its asserts counts separately (candidate = entry point).
    """
    asserts = lambda node: any(isinstance(n, ast.Assert) for n in ast.walk(node))  # noqa: E731
    if isinstance(tests, (list, tuple)):
        return [(asserts(_parse(str(t), f"tests[{i}]")), str(t)) for i, t in enumerate(tests)]
    if not isinstance(tests, str):
        raise RewardError(f"tests must be python source or a list of assert strings, got {type(tests).__name__}")
    body = _parse(tests, "tests").body
    check = next((n for n in body if isinstance(n, ast.FunctionDef) and n.name == "check"), None)
    if check is not None and not any(asserts(n) for n in body if n is not check):
        if not entry_point:
            raise RewardError("tests define check(candidate) but the sample has no entry_point")
        items = [(False, ast.unparse(n)) for n in body if n is not check and not _calls_check(n)]
        if check.args.args and check.args.args[0].arg != "candidate":
            items.append((False, f"{check.args.args[0].arg} = candidate"))
        return items + [(asserts(n), ast.unparse(n)) for n in check.body]
    return [(asserts(n), ast.unparse(n)) for n in body]


def _calls_check(node: ast.stmt) -> bool:
    return (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
            and isinstance(node.value.func, ast.Name) and node.value.func.id == "check")


def _parse(src: str, what: str) -> ast.Module:
    try:
        return ast.parse(src)
    except SyntaxError as e:
        raise RewardError(f"{what}: SyntaxError line {e.lineno}: {e.msg}") from None


class Sandbox:
    """Runs samples with `config` limits; see the module docstring."""

    def __init__(self, config: SandboxConfig | None = None):
        self.config = config or SandboxConfig()

    def run(self, code: str, tests: str | list[str], entry_point: str | None = None) -> SandboxResult:
        items = split_tests(tests, entry_point)
        if not any(is_test for is_test, _ in items):
            return SandboxResult(status="no-tests", detail="the tests contain no assert")
        with _slot(self.config.max_workers):
            return self._run_plan(code, plan_tests(items), entry_point)

    def run_many(self, codes: list[str], tests: list, entry_points: list | None = None) -> list[SandboxResult]:
        entry_points = entry_points if entry_points is not None else [None] * len(codes)
        if not len(codes) == len(tests) == len(entry_points):
            raise RewardError(f"sandbox: {len(codes)} codes, {len(tests)} tests, {len(entry_points)} entry points")
        with ThreadPoolExecutor(max_workers=self.config.max_workers, thread_name_prefix="sandbox") as pool:
            return list(pool.map(self.run, codes, tests, entry_points))

    def _run_plan(self, code: str, plan: TestPlan, entry_point: str | None) -> SandboxResult:
        cfg, start = self.config, time.monotonic()
        raw = "checker" in TEST_ONLY_DISABLED
        workdir = tempfile.mkdtemp(prefix="deepalign-sbx-")  # the new root's mount point (or weak: the cwd)
        uid = None
        if cfg.drop_privileges and os.geteuid() == 0:
            uid = _UID_BASE + secrets.randbelow(_UID_SPAN)
            os.chown(workdir, uid, uid)
        os.chmod(workdir, 0o700)
        lifeline_r, lifeline_w = os.pipe()
        job = {
            "code": code, "items": plan.raw_items if raw else plan.items, "mode": "raw" if raw else "checker",
            "entry_point": entry_point, "workdir": workdir, "uid": uid, "timeout_s": cfg.timeout_s,
            "isolate_network": cfg.isolate_network, "isolate_fs": cfg.isolate_fs,
            "isolate_processes": cfg.isolate_processes, "audit_guard": cfg.audit_guard,
            "allow_weak_isolation": cfg.allow_weak_isolation, "disk_mb": cfg.disk_mb, "max_files": cfg.max_files,
            "lifeline_fd": None if "lifeline" in TEST_ONLY_DISABLED else lifeline_r,
            "limits": {"cpu_s": int(cfg.timeout_s) + 1, "memory_mb": cfg.memory_mb, "file_mb": cfg.file_mb,
                       "nproc": cfg.nproc, "nofile": cfg.nofile},
        }
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
        try:
            proc = subprocess.Popen(
                [cfg.python or sys.executable, "-I", "-S", "-B", CHILD], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=workdir, env=env, start_new_session=True,
                pass_fds=(lifeline_r,))
        finally:
            os.close(lifeline_r)
        try:
            try:
                proc.stdin.write(json.dumps(job).encode())
                proc.stdin.close()
            except BrokenPipeError:
                pass
            result = self._collect(proc, plan, raw, start + cfg.timeout_s)
        finally:
            os.close(lifeline_w)  # the watcher kills and reaps the namespace itself, then exits
            try:
                proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass
            leftover = _kill_all(proc, uid)
            shutil.rmtree(workdir, ignore_errors=True)
        result.uid, result.elapsed_s = uid, time.monotonic() - start
        if result.status == "crashed":
            result.detail = f"exit {proc.returncode} {result.detail}"
        if leftover:
            result.detail += f" ({leftover} processes of uid {uid} survived SIGKILL)"
        if result.layers and not result.strong:
            _log_weak_once(result.layers)
        return result

    def _collect(self, proc: subprocess.Popen, plan: TestPlan, raw: bool, deadline: float) -> SandboxResult:
        """Read result lines until done, EOF, the deadline or the output cap, whichever comes first."""
        cap, out, err, used = self.config.max_output_bytes, b"", b"", 0
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        sel.register(proc.stderr, selectors.EVENT_READ)
        state = _Messages(plan, raw)
        try:
            while sel.get_map():
                left = deadline - time.monotonic()
                if left <= 0:
                    return state.result("timeout", "wall-clock timeout")
                for key, _ in sel.select(timeout=left):
                    chunk = os.read(key.fd, 1 << 16)
                    if not chunk:
                        sel.unregister(key.fileobj)
                    elif key.fileobj is proc.stderr:
                        err = (err + chunk)[-4096:]
                    else:
                        used += len(chunk)
                        if used > cap:
                            return state.result("output-limit", f"more than {cap} bytes on the result pipe")
                        *lines, out = (out + chunk).split(b"\n")
                        for line in lines:
                            final = state.feed(line)
                            if final is not None:
                                return final
        finally:
            sel.close()
        # Not proc.wait() here: reaping first would free the pid (and so the process group id)
        # for reuse before _kill_all's killpg. The exit code is filled in after the kill.
        return state.result("crashed", f"without a result; stderr: {err.decode(errors='replace')[-300:]}")


class _Messages:
    """The child's lines: the watcher's {"setup"} first (trusted), then the runner's (untrusted)."""

    def __init__(self, plan: TestPlan, raw: bool):
        self.plan, self.raw, self.layers, self.items, self.load = plan, raw, None, [], None

    def result(self, status: str, detail: str = "") -> SandboxResult:
        return SandboxResult(status=status, layers=dict(self.layers or {}), detail=detail,
                             total=sum(kind == "test" for kind, _ in self.plan.items))

    def feed(self, line: bytes) -> SandboxResult | None:
        try:
            msg = json.loads(line)
        except ValueError:
            msg = None
        if type(msg) is not dict:
            return self.result("protocol-error", "unexpected result line")
        if self.layers is None:  # the first line comes from the watcher, before the code exists
            if "setup_error" in msg:
                return self.result("setup-error", " ".join(str(msg["setup_error"]).split())[:400])
            if type(msg.get("setup")) is not dict:
                return self.result("protocol-error", "no setup line")
            self.layers = {str(k): str(v) for k, v in msg["setup"].items()}
            return None
        if "load" in msg and self.load is None:
            self.load = str(msg["load"])[:40]
            if self.load != "-":
                return self.result("load-error", f"the solution raised {self.load}")
        elif "item" in msg and self.load == "-":
            self.items.append(msg)
        elif msg.get("done") is True and self.load == "-":
            passed, total, bits = judge(self.plan, self.items, self.raw)
            return SandboxResult(status="ok", passed=passed, total=total, layers=dict(self.layers), detail=bits)
        else:
            return self.result("protocol-error", "unexpected result line")
        return None


class _slot:  # noqa: N801  (a context manager used like a function)
    """Hold one of the process-wide `max_workers` slots for the duration of a run."""

    def __init__(self, n: int):
        with _slots_lock:
            self.sem = _slots.setdefault(n, threading.BoundedSemaphore(n))

    def __enter__(self) -> None:
        self.sem.acquire()

    def __exit__(self, *exc) -> None:
        self.sem.release()


def _log_weak_once(layers: dict[str, str]) -> None:
    global _weak_logged
    if not _weak_logged:
        _weak_logged = True
        _log.warning("code sandbox: weak isolation (allow_weak_isolation: true), layers %s", layers)


def _kill_all(proc: subprocess.Popen, uid: int | None) -> int:
    """SIGKILL the child's process group (unless it already exited and was reaped: its id may be
    reused) and, with a fresh uid, everything that uid still runs. Returns the survivors."""
    if proc.returncode is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe and not pipe.closed:
            pipe.close()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    if uid is None:
        return 0
    for _ in range(200):
        pids = processes_of_uid(uid)
        if not pids:
            return 0
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)
    return len(processes_of_uid(uid))


def processes_of_uid(uid: int) -> list[int]:
    """Live (non-zombie) processes whose real uid is `uid`, from /proc."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            status = Path(f"/proc/{name}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if fields.get("Uid", "").split()[:1] == [str(uid)] and not fields.get("State", "").strip().startswith("Z"):
            pids.append(int(name))
    return pids
