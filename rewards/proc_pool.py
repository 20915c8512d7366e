"""A small pool of worker processes whose tasks can be killed: CPU-bound scorers (math-verify) run
here, never in an unkillable thread.

Each worker (`python -m rewards.proc_pool`, spawned fresh: nothing is forked from the trainer's
threads) runs one task at a time: `module:function(*args)`, pickled over its stdin/stdout. A task
still running at its timeout gets its worker SIGKILLed; the next task that needs a worker spawns a
fresh one. So a pathological input costs at most one timeout and one respawn, never a hung thread.

Workers die with the trainer: each sets PR_SET_PDEATHSIG(SIGKILL), and all are spawned by one
long-lived launcher thread, because the parent-death signal fires when the spawning *thread* exits
(a pool thread would take its workers with it). Workers also get an address-space limit, so an
input that allocates without bound fails there and not in the trainer.
"""

from __future__ import annotations

import atexit
import importlib
import os
import pickle
import queue
import select
import struct
import subprocess
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


class TaskTimeout(TimeoutError):
    pass


class _Launcher:
    """One daemon thread that lives as long as the process and spawns every worker."""

    def __init__(self) -> None:
        self.requests: queue.Queue = queue.Queue()
        threading.Thread(target=self._loop, name="proc-pool-launcher", daemon=True).start()

    def _loop(self) -> None:
        while True:
            argv, fut = self.requests.get()
            try:
                fut.set_result(subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                stderr=subprocess.DEVNULL))
            except BaseException as e:  # noqa: BLE001
                fut.set_exception(e)

    def spawn(self, argv: list[str]) -> subprocess.Popen:
        fut: Future = Future()
        self.requests.put((argv, fut))
        return fut.result()


_launcher: _Launcher | None = None
_launcher_lock = threading.Lock()


def _send(pipe, obj: Any) -> None:
    data = pickle.dumps(obj)
    pipe.write(struct.pack("<Q", len(data)) + data)
    pipe.flush()


def _recv(fd: int) -> Any:
    def exactly(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = os.read(fd, n - len(buf))
            if not chunk:
                raise EOFError("the worker exited")
            buf += chunk
        return buf

    return pickle.loads(exactly(struct.unpack("<Q", exactly(8))[0]))


class ProcessPool:
    """`workers` killable worker processes; `map` runs tasks on them with a per-task timeout."""

    def __init__(self, workers: int = 2, memory_mb: int = 4096, preload: tuple[str, ...] = (),
                 start_timeout_s: float = 120.0):
        global _launcher
        with _launcher_lock:
            _launcher = _launcher or _Launcher()
        self.workers, self.memory_mb, self.preload, self.start_timeout_s = workers, memory_mb, preload, start_timeout_s
        self.idle: queue.Queue = queue.Queue()
        for _ in range(workers):
            self.idle.put(None)  # a slot; its process is spawned on first use
        self.killed = 0  # workers killed at a timeout (for tests and logs)
        self.threads = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="proc-pool")
        atexit.register(self.close)

    def _spawn(self) -> subprocess.Popen:
        """A fresh worker, ready: its imports (`preload`) are done, so they never eat a task's timeout."""
        proc = _launcher.spawn([sys.executable, "-m", "rewards.proc_pool", str(os.getpid()), str(self.memory_mb),
                                *self.preload])
        if not select.select([proc.stdout], [], [], self.start_timeout_s)[0]:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"a worker did not start within {self.start_timeout_s:g}s")
        _recv(proc.stdout.fileno())
        return proc

    def run(self, target: str, args: tuple, timeout: float) -> Any:
        """target(*args) in a worker; TaskTimeout if it runs past `timeout` (the worker is killed)."""
        proc = self.idle.get()
        timed_out = False
        try:
            if proc is None or proc.poll() is not None:
                proc = self._spawn()
            _send(proc.stdin, (target, args))
            if select.select([proc.stdout], [], [], timeout)[0]:
                ok, value = _recv(proc.stdout.fileno())
            else:
                timed_out = True
        except (EOFError, OSError) as e:
            _kill(proc)
            proc = None
            raise RuntimeError(f"{target}: the worker died ({type(e).__name__})") from None
        finally:
            if timed_out:
                _kill(proc)
                self.killed += 1
                proc = None
            self.idle.put(proc)
        if timed_out:
            raise TaskTimeout(f"{target} ran past {timeout:g}s and was killed")
        if not ok:
            raise value
        return value

    def map(self, target: str, arg_list: list[tuple], timeout: float) -> list[Any]:
        """Results in order; a task's exception (TaskTimeout included) is returned in its place."""
        def one(args: tuple) -> Any:
            try:
                return self.run(target, args, timeout)
            except Exception as e:  # noqa: BLE001
                return e

        return list(self.threads.map(one, arg_list))

    def close(self) -> None:
        while not self.idle.empty():
            proc = self.idle.get_nowait()
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


def _kill(proc: subprocess.Popen | None) -> None:
    if proc is not None:
        proc.kill()
        proc.wait()


def _worker_main(parent: int, memory_mb: int, preload: list[str]) -> None:
    import ctypes  # noqa: PLC0415
    import resource  # noqa: PLC0415

    ctypes.CDLL(None).prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG, SIGKILL
    if os.getppid() != parent:
        os._exit(0)
    resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    for module in preload:
        importlib.import_module(module)
    _send(out, "ready")
    while True:
        try:
            target, args = _recv(inp.fileno())
        except EOFError:
            os._exit(0)
        module, _, name = target.partition(":")
        try:
            result = (True, getattr(importlib.import_module(module), name)(*args))
        except Exception as e:  # noqa: BLE001
            result = (False, e)
        try:
            _send(out, result)
        except Exception as e:  # noqa: BLE001  (an unpicklable result or exception)
            _send(out, (False, RuntimeError(f"{type(e).__name__}: {e}")))


if __name__ == "__main__":
    _worker_main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:])
