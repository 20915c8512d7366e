"""Run untrusted model-written Python against unit tests, contained, and count passed asserts.

Parent side. Each sample runs in a fresh `python -I -S rewards/sandbox_child.py` process (see that
file for the isolation layers, all set up in the child before the untrusted code is compiled) in
its own session (process group) with a fresh temporary directory as cwd/HOME/TMPDIR and an
environment holding only PATH, so secrets in os.environ are never visible.

We deliberately do NOT use Popen(preexec_fn=...): it is unsafe with threads (this runs inside Ray
workers and a thread pool) and disables vfork. The child sets its own limits before running code.

Containment as root (the normal case here): the child drops to a random, otherwise unused uid, so
RLIMIT_NPROC really binds (the kernel exempts root), kill(-1) cannot reach anything else, and
after the run we SIGKILL the process group AND every process still owned by that uid (a fork bomb
may have left the group with setsid). The result comes back on the child's stdout as lines that
start with a random per-run nonce; anything else written there is ignored, and more than
`max_output_bytes` of it kills the run.
"""

from __future__ import annotations

import ast
import json
import os
import re
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from rewards.errors import RewardError

CHILD = str(Path(__file__).with_name("sandbox_child.py"))
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_UID_BASE, _UID_SPAN = 2_000_000_000, 100_000_000  # far from system and subuid ranges


class SandboxConfig(BaseModel):
    """Limits for ONE sample (they apply to the child process, not to the batch)."""

    model_config = ConfigDict(extra="forbid")
    timeout_s: float = Field(10.0, gt=0, description="wall clock per sample, incl. interpreter start")
    memory_mb: int = Field(1024, ge=64, description="RLIMIT_AS (virtual memory)")
    file_mb: int = Field(16, ge=1, description="RLIMIT_FSIZE")
    nproc: int = Field(64, ge=1, description="RLIMIT_NPROC for the sandbox uid")
    nofile: int = Field(64, ge=16)
    max_workers: int = Field(2, ge=1, description="samples run concurrently (the machine has 2 cores)")
    max_output_bytes: int = Field(1 << 16, ge=1024, description="result-pipe bytes before the run is killed")
    isolate_network: bool = True  # network namespace (falls back to the audit hook)
    isolate_fs: bool = True  # mount namespace, as root only (falls back to the audit hook)
    isolate_processes: bool = True  # PID namespace: everything dies (and is reaped) with the run
    drop_privileges: bool = True  # as root: run as a fresh uid
    audit_guard: bool = True  # in-process audit hook layer
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
    """Runs samples with `config` limits; `run_many` keeps at most `max_workers` children alive."""

    def __init__(self, config: SandboxConfig | None = None):
        self.config = config or SandboxConfig()

    def run(self, code: str, tests: str | list[str], entry_point: str | None = None) -> SandboxResult:
        items = split_tests(tests, entry_point)
        if not any(is_test for is_test, _ in items):
            return SandboxResult(status="no-tests", detail="the tests contain no assert")
        return self._run_items(code, items, entry_point)

    def run_many(self, codes: list[str], tests: list, entry_points: list | None = None) -> list[SandboxResult]:
        entry_points = entry_points if entry_points is not None else [None] * len(codes)
        if not len(codes) == len(tests) == len(entry_points):
            raise RewardError(f"sandbox: {len(codes)} codes, {len(tests)} tests, {len(entry_points)} entry points")
        with ThreadPoolExecutor(max_workers=self.config.max_workers, thread_name_prefix="sandbox") as pool:
            return list(pool.map(self.run, codes, tests, entry_points))

    def _run_items(self, code: str, items: list[tuple[bool, str]], entry_point: str | None) -> SandboxResult:
        cfg, start = self.config, time.monotonic()
        nonce = secrets.token_hex(16)
        workdir = tempfile.mkdtemp(prefix="deepalign-sbx-")
        uid = None
        if cfg.drop_privileges and os.geteuid() == 0:
            uid = _UID_BASE + secrets.randbelow(_UID_SPAN)
            os.chown(workdir, uid, uid)
        os.chmod(workdir, 0o700)
        job = {
            "nonce": nonce, "code": code, "items": items, "entry_point": entry_point, "workdir": workdir,
            "uid": uid, "gid": uid, "isolate_network": cfg.isolate_network, "isolate_fs": cfg.isolate_fs,
            "isolate_processes": cfg.isolate_processes, "audit_guard": cfg.audit_guard,
            "limits": {"cpu_s": int(cfg.timeout_s) + 1, "memory_mb": cfg.memory_mb, "file_mb": cfg.file_mb,
                       "nproc": cfg.nproc, "nofile": cfg.nofile},
        }
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
        proc = subprocess.Popen(
            [cfg.python or sys.executable, "-I", "-S", "-B", CHILD], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=workdir, env=env, start_new_session=True)
        try:
            try:
                proc.stdin.write(json.dumps(job).encode())
                proc.stdin.close()
            except BrokenPipeError:
                pass
            result = self._collect(proc, nonce, start + cfg.timeout_s)
        finally:
            leftover = _kill_all(proc, uid)
            shutil.rmtree(workdir, ignore_errors=True)
        result.uid, result.elapsed_s = uid, time.monotonic() - start
        if result.status == "crashed":
            result.detail = f"exit {proc.returncode} {result.detail}"
        if leftover:
            result.detail += f" ({leftover} processes of uid {uid} survived SIGKILL)"
        return result

    def _collect(self, proc: subprocess.Popen, nonce: str, deadline: float) -> SandboxResult:
        """Read result lines until DONE, EOF, the deadline or the output cap, whichever comes first."""
        cap, out, err = self.config.max_output_bytes, b"", b""
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        sel.register(proc.stderr, selectors.EVENT_READ)
        layers: dict[str, str] = {}
        try:
            while sel.get_map():
                left = deadline - time.monotonic()
                if left <= 0:
                    return SandboxResult(status="timeout", layers=layers, detail="wall-clock timeout")
                for key, _ in sel.select(timeout=left):
                    chunk = os.read(key.fd, 1 << 16)
                    if not chunk:
                        sel.unregister(key.fileobj)
                    elif key.fileobj is proc.stderr:
                        err = (err + chunk)[:4096]
                    else:
                        out += chunk
                        if len(out) > cap:
                            return SandboxResult(status="output-limit", layers=layers,
                                                 detail=f"more than {cap} bytes on the result pipe")
                        lines = [ln for ln in out.split(b"\n")[:-1] if ln.startswith(nonce.encode() + b" ")]
                        result = _parse_lines(lines, nonce, layers)
                        if result is not None:
                            return result
        finally:
            sel.close()
        # Not proc.wait() here: reaping first would free the pid (and so the process group id)
        # for reuse before _kill_all's killpg. The exit code is filled in after the kill.
        return SandboxResult(status="crashed", layers=layers,
                             detail=f"without a result; stderr: {err.decode(errors='replace')[-300:]}")


def _parse_lines(lines: list[bytes], nonce: str, layers: dict[str, str]) -> SandboxResult | None:
    """Interpret nonce-tagged lines; None while the run is not finished."""
    done = None
    for raw in lines:
        words = raw.decode(errors="replace").split(" ")[1:]
        if words[0] == "SETUP":
            layers.update(w.split("=", 1) for w in words[1:] if "=" in w)
        elif words[0] == "SETUP-ERROR":
            return SandboxResult(status="setup-error", layers=layers, detail=" ".join(words[1:]))
        elif words[0] == "DONE" and done is None and len(words) == 5:
            done = words[1:]
        else:
            return SandboxResult(status="protocol-error", layers=layers, detail="unexpected result line")
    if done is None:
        return None
    passed, total, bits, load_error = done
    if not (passed.isdigit() and total.isdigit()):
        return SandboxResult(status="protocol-error", layers=layers, detail="malformed DONE line")
    if load_error != "-":
        return SandboxResult(status="load-error", total=int(total), layers=layers,
                             detail=f"the solution raised {load_error}")
    return SandboxResult(status="ok", passed=int(passed), total=int(total), layers=layers, detail=bits)


def _kill_all(proc: subprocess.Popen, uid: int | None) -> int:
    """SIGKILL the child's process group and, with a private uid, everything that uid still runs."""
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
