"""Child side of the code sandbox: the watcher process ("P") that contains ONE untrusted program.

Started by rewards/sandbox.py as `python -I -S -B sandbox_child.py` with a JSON job on stdin. Only
the standard library is used (-S: no site-packages). Everything privileged and every limit is set up
BEFORE the untrusted code is compiled:

  1. read the job, then point fds 0/1/2 at /dev/null; the original stdout becomes the result fd.
  2. strong isolation (sandbox_ns.py): P creates PID and mount namespaces, stages the private
     read-only root with the bounded tmpfs work dir, and forks X, its pid 1; X enters user, mount,
     network and IPC namespaces (P writes its uid map from outside), pivots into the root, drops
     every capability, then forks the worker W. Where the kernel refuses a namespace, P refuses the run with one line naming
     `allow_weak_isolation: true`; only with it does W run under the audit hook alone (as root,
     under a fresh uid where the stdlib is reachable).
  3. W sets the resource limits, installs the audit hook (sandbox_guard.py) and runs the solution
     and the rewritten tests (sandbox_runner.py), reporting plain data on the result fd.
  4. P writes the one trusted line, {"setup": layers}, before W exists, then only watches: it
     SIGKILLs X (and with it the whole namespace) at its own deadline, or as soon as the "lifeline"
     pipe from the trainer reaches EOF -- which happens when the trainer process dies, whatever
     thread started us -- and otherwise exits with X's status. X dies with P (parent-death signal;
     P is single-threaded). No deadline relies on a signal the code could catch or ignore.
"""

import json
import os
import resource
import select
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sandbox_guard  # noqa: E402
import sandbox_ns as ns  # noqa: E402
import sandbox_runner  # noqa: E402

sys.path.pop(0)
WEAK_HINT = ("the code sandbox needs root or unprivileged user namespaces (any stock Linux); "
             "set `allow_weak_isolation: true` in the sandbox config to run with the in-process audit hook only")


def _set_limits(lim: dict) -> None:
    for name, value in (("RLIMIT_CORE", 0), ("RLIMIT_CPU", lim["cpu_s"]),
                        ("RLIMIT_AS", lim["memory_mb"] << 20), ("RLIMIT_FSIZE", lim["file_mb"] << 20),
                        ("RLIMIT_NOFILE", lim["nofile"]), ("RLIMIT_NPROC", lim["nproc"])):
        resource.setrlimit(getattr(resource, name), (value, value))


def _blocked_ancestor(path: str) -> str | None:
    """Topmost ancestor of `path` that 'other' users cannot traverse (no o+x), if any."""
    cur = ""
    for p in os.path.realpath(path).split(os.sep)[1:-1]:
        cur += os.sep + p
        if not os.stat(cur).st_mode & 0o001:
            return cur
    return None


def _worker(job: dict, out: int, workdir: str, readable: list[str]) -> None:
    """W: limits, environment, audit hook, then the untrusted code. Never returns."""
    def write_line(line: str) -> None:
        data = line.encode() + b"\n"
        while data:
            data = data[os.write(out, data):]

    try:
        _set_limits(job["limits"])
        os.environ.update(HOME=workdir, TMPDIR=workdir)
        os.chdir(workdir)
        if job["audit_guard"]:
            sandbox_guard.install(workdir, readable)
    except BaseException as e:  # noqa: BLE001  (never run the code half set up)
        write_line(json.dumps({"setup_error": f"worker setup: {e!r}"[:300]}))
        os._exit(3)
    for mod in ("ctypes", "_ctypes", "ctypes._endian", "sandbox_ns", "sandbox_guard", "sandbox_runner"):
        sys.modules.pop(mod, None)
    sandbox_runner.run(job, write_line)
    os._exit(0)  # skip atexit handlers and thread joins registered by the untrusted code


def _send(fd: int, msg: bytes) -> None:
    os.write(fd, msg)


def _expect(fd: int, deadline: float) -> bytes:
    """The next message from the other side of a sync pipe: one byte, or b'E...' up to EOF."""
    left = max(0.0, deadline - time.monotonic())
    if not select.select([fd], [], [], left)[0]:
        return b"Etimed out setting up the namespaces"
    first = os.read(fd, 1)
    if first != b"E":
        return first or b"Ethe namespace process died during setup"
    rest = b""
    while chunk := os.read(fd, 4096):
        rest += chunk
    return b"E" + rest


def _close_lifeline(job: dict) -> None:
    if job["lifeline_fd"] is not None:
        os.close(job["lifeline_fd"])


def _namespace_init(job: dict, out: int, to_p: int, from_p: int, readable: list[str]) -> None:
    """X: enter the namespaces, build the root, drop privileges, then fork W and reap. Never returns."""
    try:
        _close_lifeline(job)
        if job["uid"] is not None and os.geteuid() == 0:  # become the fresh uid before the namespace
            os.setgroups([])
            os.setresgid(job["uid"], job["uid"], job["uid"])
            os.setresuid(job["uid"], job["uid"], job["uid"])
        ns.set_pdeathsig()
        flags = ns.CLONE_NEWUSER | ns.CLONE_NEWIPC | (ns.CLONE_NEWNS if job["isolate_fs"] else 0) | (
            ns.CLONE_NEWNET if job["isolate_network"] else 0)
        ns.unshare(flags, "unshare(user/mount/net namespaces)")
        _send(to_p, b"u")
        if os.read(from_p, 1) != b"m":
            os._exit(3)
        ns.set_pdeathsig()  # credentials changed: the kernel cleared it
        ns.forbid_nested_user_namespaces()
        workdir = job["workdir"]
        if job["isolate_fs"]:
            ns.enter_root(job["workdir"])
            workdir = ns.WORKDIR
        ns.drop_capabilities()
    except BaseException as e:  # noqa: BLE001
        _send(to_p, b"E" + " ".join(str(e).split()).encode()[:300])
        os._exit(3)
    _send(to_p, b"r")
    if os.read(from_p, 1) != b"g":
        os._exit(3)
    os.close(to_p)
    os.close(from_p)
    if not job["isolate_processes"]:
        _worker(job, out, workdir, readable)
    worker = os.fork()
    if worker == 0:
        _worker(job, out, workdir, readable)
    os.close(out)
    while True:  # pid 1: reap everything; leave with the worker
        pid, status = os.waitpid(-1, 0)
        if pid == worker:
            os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


def _start_strong(job: dict, out: int, deadline: float) -> tuple[int, dict, tuple[int, int]] | str:
    """Fork X into fresh namespaces. Returns (X's pid, layers, sync pipe ends) or why it is impossible."""
    root = os.geteuid() == 0
    try:
        if not root:
            ns.enter_own_user_namespace()
        flags = (ns.CLONE_NEWPID if job["isolate_processes"] else 0) | (ns.CLONE_NEWNS if job["isolate_fs"] else 0)
        if flags:
            ns.unshare(flags, "unshare(pid/mount namespaces)")
        readable = ns.readable_roots()
        if job["isolate_fs"]:
            ns.stage_root(job["workdir"], job["disk_mb"], job["max_files"])
    except OSError as e:
        return str(e)
    to_p_r, to_p_w = os.pipe()
    to_x_r, to_x_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(to_p_r)
        os.close(to_x_w)
        _namespace_init(job, out, to_p_w, to_x_r, readable)
    os.close(to_p_w)
    os.close(to_x_r)
    msg = _expect(to_p_r, deadline)
    if msg == b"u":
        uid = job["uid"] if root and job["uid"] is not None else os.geteuid()
        try:
            ns.write_maps(pid, uid, uid if root and job["uid"] is not None else os.getegid(), ns.INNER_ID)
            _send(to_x_w, b"m")
            msg = _expect(to_p_r, deadline)
        except OSError as e:
            msg = b"E" + f"writing the uid map: {e}".encode()
    if msg != b"r":
        _kill(pid)
        return msg[1:].decode(errors="replace")
    layers = {"net": "netns" if job["isolate_network"] else "none",
              "fs": "tmpfs-root" if job["isolate_fs"] else "audit-hook",
              "pid": "pidns" if job["isolate_processes"] else "none", "user": "userns",
              "uid": job["uid"] if root and job["uid"] is not None else os.geteuid()}
    return pid, layers, (to_p_r, to_x_w)


def _start_weak(job: dict, out: int, write_line) -> int:
    """W directly under P, the audit hook its only layer (as root: a fresh uid if it can run)."""
    layers = {"net": "audit-hook", "fs": "audit-hook", "pid": "none", "user": "none", "uid": os.geteuid()}
    uid = job["uid"] if os.geteuid() == 0 else None
    if uid is not None and any(map(_blocked_ancestor, sys.path)):
        uid = None  # the fresh uid could not import the stdlib (e.g. pyenv under /root)
    if uid is not None:
        layers.update(user="uid-drop", uid=uid)
    write_line({"setup": layers})  # before the code exists: the only line we vouch for
    pid = os.fork()
    if pid == 0:
        _close_lifeline(job)
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        _worker(job, out, job["workdir"], ns.readable_roots())
    return pid


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def _watch(pid: int, lifeline: int | None, deadline: float) -> int:
    """Wait for X, the deadline or the lifeline's EOF; on the last two, SIGKILL X. Exit status."""
    pidfd = os.pidfd_open(pid)
    watched = [pidfd] + ([lifeline] if lifeline is not None else [])
    while (left := deadline - time.monotonic()) > 0:
        ready = select.select(watched, [], [], left)[0]
        if pidfd in ready:
            _, status = os.waitpid(pid, 0)
            return os.waitstatus_to_exitcode(status) & 0xFF
        if lifeline in ready:
            break
    _kill(pid)
    return 9


def main() -> None:
    job = json.loads(sys.stdin.buffer.read())
    deadline = time.monotonic() + job["timeout_s"] + 1.0  # the trainer's own deadline comes first
    out = os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)

    def write_line(obj: dict) -> None:
        data = json.dumps(obj).encode() + b"\n"
        while data:
            data = data[os.write(out, data):]

    want = job["isolate_network"] or job["isolate_fs"] or job["isolate_processes"]
    started = _start_strong(job, out, deadline) if want else "isolation switched off in the config"
    if isinstance(started, str):
        if not job["allow_weak_isolation"]:
            write_line({"setup_error": f"weak isolation refused ({started}): {WEAK_HINT}"})
            os._exit(3)
        pid = _start_weak(job, out, write_line)
    else:
        pid, layers, (from_x, to_x) = started
        strong = (layers["net"], layers["fs"], layers["pid"]) == ("netns", "tmpfs-root", "pidns")
        if not strong and not job["allow_weak_isolation"]:
            _kill(pid)
            write_line({"setup_error": f"weak isolation refused (layers {layers}): {WEAK_HINT}"})
            os._exit(3)
        write_line({"setup": layers})  # before the code exists: the only line we vouch for
        _send(to_x, b"g")
        os.close(to_x)
        os.close(from_x)
    os.close(out)
    os._exit(_watch(pid, job["lifeline_fd"], deadline))


if __name__ == "__main__":
    main()
