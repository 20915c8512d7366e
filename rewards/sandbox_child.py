"""Child side of the code sandbox: runs ONE untrusted program against its tests.

Started by rewards/sandbox.py as `python -I -S sandbox_child.py` with a JSON job on stdin.
It must only use the standard library (-S: no site-packages; -I: no env, no cwd on sys.path).

Order matters: everything privileged (namespaces, mounts, uid switch) and every limit is set up
BEFORE the untrusted code is compiled, so the code never runs with more than the sandbox allows:

  1. read the job (incl. a random nonce) from stdin, then point fds 0/1/2 at /dev/null; the
     original stdout becomes the private result fd. Only lines starting with the nonce count.
  2. resource limits (CPU, address space, file size, open files, processes, no core dumps).
  3. as root: new network namespace (no interfaces but a down loopback -> no network), new mount
     namespace (throw-away tmpfs over /tmp, /var/tmp, /dev/shm and over any directory the sandbox
     uid could not traverse to reach the interpreter, e.g. /root), new PID namespace (its own
     /proc; when it ends the kernel kills and reaps everything in it), then drop to a per-run uid
     so RLIMIT_NPROC binds (root ignores it) and the kernel denies writes to, signals to, and
     reads of, anything owned by other users. Not root: user+net+pid namespaces if allowed.
  4. an audit hook (PEP 578) as an in-process second layer: no sockets, no new processes, no
     writes outside the work dir, no /proc reads, no ctypes, no frame/gc introspection that could
     reach the nonce, no signals to other processes.
  5. exec the solution, then each test statement separately; report "<nonce> DONE passed total".
"""

import json
import os
import resource
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18


def _set_limits(lim: dict) -> None:
    for name, value in (("RLIMIT_CORE", 0), ("RLIMIT_CPU", lim["cpu_s"]),
                        ("RLIMIT_AS", lim["memory_mb"] << 20), ("RLIMIT_FSIZE", lim["file_mb"] << 20),
                        ("RLIMIT_NOFILE", lim["nofile"]), ("RLIMIT_NPROC", lim["nproc"])):
        resource.setrlimit(getattr(resource, name), (value, value))


def _libc():
    import ctypes  # noqa: PLC0415  (only needed here; removed from sys.modules before user code)

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    return libc, ctypes


def _mount(libc, ctypes, src, target, fstype, flags, data=None) -> None:
    enc = lambda s: None if s is None else os.fsencode(s)  # noqa: E731
    if libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {target}: {os.strerror(err)}")


def _blocked_ancestor(path: str) -> str | None:
    """Topmost ancestor of `path` that 'other' users cannot traverse (no o+x), if any."""
    parts = os.path.realpath(path).split(os.sep)[1:]
    cur = ""
    for p in parts[:-1]:
        cur += os.sep + p
        if not os.stat(cur).st_mode & 0o001:
            return cur
    return None


def _isolate_fs(libc, ctypes, workdir: str) -> None:
    """Private mount namespace: hide other users' dirs and world-writable scratch dirs."""
    _mount(libc, ctypes, None, "/", None, MS_REC | MS_PRIVATE)
    # The interpreter's stdlib may live under a dir the sandbox uid can't enter (pyenv in /root):
    # cover that dir with an empty tmpfs and bind back only the stdlib, read-only.
    keep = sorted({os.path.realpath(p) for p in sys.path if os.path.isdir(p)})
    keep = [p for p in keep if not any(p != q and p.startswith(q + os.sep) for q in keep)]
    for top in sorted({a for a in map(_blocked_ancestor, keep) if a}):
        inner = [p for p in keep if p.startswith(top + os.sep)]
        fds = {p: os.open(p, os.O_PATH | os.O_DIRECTORY) for p in inner}
        _mount(libc, ctypes, "tmpfs", top, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=1m")
        for p, fd in fds.items():
            os.makedirs(p, mode=0o755, exist_ok=True)
            _mount(libc, ctypes, f"/proc/self/fd/{fd}", p, None, MS_BIND | MS_REC)
            _mount(libc, ctypes, None, p, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
            os.close(fd)
    # Scratch dirs everyone can write to become private throw-away tmpfs; the work dir (usually
    # under /tmp) is bound back at its own path so absolute paths to it keep working.
    wd_fd = os.open(workdir, os.O_PATH | os.O_DIRECTORY)
    for d in ("/tmp", "/var/tmp", "/dev/shm"):
        if os.path.isdir(d) and not os.path.islink(d):
            _mount(libc, ctypes, "tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777,size=16m")
    os.makedirs(workdir, mode=0o755, exist_ok=True)
    _mount(libc, ctypes, f"/proc/self/fd/{wd_fd}", workdir, None, MS_BIND)
    os.close(wd_fd)
    os.chdir(workdir)


def _unshare(libc, flags: int) -> int:
    """unshare() as many of `flags` as the kernel allows (all at once, else one by one)."""
    if libc.unshare(flags) == 0:
        return flags
    return sum(f for f in (CLONE_NEWNET, CLONE_NEWNS, CLONE_NEWPID) if flags & f and libc.unshare(f) == 0)


def _enter_pid_namespace(own_proc) -> None:
    """Fork twice: pid 1 of the new PID namespace only reaps; its child (pid 2) runs the code.

    When pid 1 exits (or is SIGKILLed by the parent) the kernel kills AND reaps every process in
    the namespace, so fork bombs leave neither processes nor zombies behind.
    """
    init = os.fork()
    if init:  # still outside the namespace: mirror the namespace's exit status
        _, status = os.waitpid(init, 0)
        os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
    if own_proc:  # a /proc that only shows this namespace (else the host's stays, still guarded)
        try:
            _mount(*own_proc, "proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        except OSError:
            pass
    worker = os.fork()
    if worker:
        while True:
            pid, status = os.waitpid(-1, 0)
            if pid == worker:
                os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


def _isolate(job: dict) -> dict:
    """Namespaces and uid switch. Returns which layers are active (reported to the parent)."""
    layers = {"net": "audit-hook", "fs": "audit-hook", "pid": "none", "uid": os.getuid()}
    uid, root = job["uid"], os.geteuid() == 0
    want = ((CLONE_NEWNET if job["isolate_network"] else 0) | (CLONE_NEWNS if job["isolate_fs"] and root else 0)
            | (CLONE_NEWPID if job["isolate_processes"] else 0))
    if not (want or uid is not None):
        return layers
    libc, ctypes = _libc()
    try:
        if root:
            got = _unshare(libc, want)
        else:  # unprivileged: only inside a new user namespace
            got = want if want and libc.unshare(CLONE_NEWUSER | want) == 0 else 0
        layers["net"] = "netns" if got & CLONE_NEWNET else layers["net"]
        if got & CLONE_NEWNS:
            try:
                _isolate_fs(libc, ctypes, job["workdir"])
                layers["fs"] = "mountns"
            except OSError:
                pass
        if got & CLONE_NEWPID:
            _enter_pid_namespace(own_proc=layers["fs"] == "mountns" and (libc, ctypes))
            layers["pid"] = "pidns"
        # Without the mount namespace the new uid may not reach the stdlib (e.g. pyenv in /root).
        if root and uid is not None and (layers["fs"] == "mountns" or not any(map(_blocked_ancestor, sys.path))):
            os.setgroups([])
            os.setgid(job["gid"])
            os.setuid(uid)
            layers["uid"] = os.getuid()
    finally:
        for mod in ("ctypes", "_ctypes", "ctypes._endian"):
            sys.modules.pop(mod, None)
    return layers


def _install_guard(workdir: str) -> None:
    """Audit hook: the in-process layer. Not a security boundary on its own (the OS layers are)."""
    root = os.path.realpath(workdir)
    realpath, join, getcwd, isinstance_, str_, bytes_, fspath = (
        os.path.realpath, os.path.join, os.getcwd, isinstance, str, bytes, os.fspath)
    me = os.getpid()
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    deny_events = {
        "os.system", "os.exec", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "subprocess.Popen",
        "socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.sendto",
        "sys._current_frames", "sys.settrace", "sys.setprofile", "gc.get_objects", "gc.get_referrers",
        "gc.get_referents", "code.__new__", "os.setsid", "os.chroot", "cpython._PySys_ClearAuditHooks",
    }
    deny_imports = {"ctypes", "_ctypes", "_posixsubprocess", "_xxsubinterpreters", "_testcapi", "_testinternalcapi"}
    frame_attrs = {"tb_frame", "gi_frame", "cr_frame", "ag_frame", "f_back", "f_locals", "f_globals"}
    write_path_events = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.symlink", "os.link",
                         "os.chmod", "os.chown", "os.truncate", "os.utime", "shutil.rmtree", "shutil.copyfile"}

    def inside(path) -> bool:
        try:
            p = fspath(path)
        except TypeError:
            return True  # file descriptors: the process only holds its own
        if isinstance_(p, bytes_):
            p = p.decode(errors="replace")
        full = realpath(join(getcwd(), p))
        return full == root or full.startswith(root + "/")

    def hook(event: str, args: tuple) -> None:
        if event in deny_events:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "sys._getframe":
            raise ValueError("sandbox: frame access is not allowed")  # ValueError: stdlib tolerates it
        if event == "object.__getattr__" and args[1] in frame_attrs:
            raise PermissionError("sandbox: frame access is not allowed")
        if event.startswith("ctypes.") or (event == "import" and args[0] in deny_imports):
            raise PermissionError(f"sandbox: {args[0] if event == 'import' else event} is not allowed")
        if event == "open":
            path, mode, flags = args
            if isinstance_(path, (str_, bytes_)):
                p = path if isinstance_(path, str_) else path.decode(errors="replace")
                full = realpath(join(getcwd(), p))
                if full in ("/proc", "/sys") or full.startswith(("/proc/", "/sys/", "/dev/mem", "/dev/kmem")):
                    raise PermissionError(f"sandbox: opening {p} is not allowed")
                writing = (isinstance_(mode, str_) and any(c in mode for c in "wax+")) or (
                    isinstance_(flags, int) and flags & write_flags)
                if writing and not inside(path):
                    raise PermissionError(f"sandbox: writing outside the work dir ({p}) is not allowed")
        elif event in write_path_events:
            for a in args[:2]:
                if isinstance_(a, (str_, bytes_)) or hasattr(a, "__fspath__"):
                    if not inside(a) and not (event == "os.symlink" and a is args[0]):
                        raise PermissionError(f"sandbox: {event} outside the work dir is not allowed")
        elif event in ("os.kill", "os.killpg"):
            pid = args[0]
            if event == "os.killpg" or pid not in (0, me):
                raise PermissionError("sandbox: signalling other processes is not allowed")

    sys.addaudithook(hook)
    # A Python signal handler receives the interrupted frame (not audited), from which f_back
    # reaches the runner: only SIG_DFL / SIG_IGN may be installed.
    import _signal  # noqa: PLC0415
    import signal  # noqa: PLC0415

    raw_signal, dfl, ign = _signal.signal, _signal.SIG_DFL, _signal.SIG_IGN

    def no_handlers(signalnum, handler):
        if handler not in (dfl, ign, 0, 1):
            raise PermissionError("sandbox: Python signal handlers are not allowed")
        return raw_signal(int(signalnum), int(handler))

    _signal.signal = signal.signal = no_handlers
    deny_imports.add("_signal")


def _run(job: dict, report) -> None:
    """Exec the solution, then every test item; only the original process may report."""
    # Capture everything used after the untrusted code starts: it may rebind builtins/modules.
    compile_, exec_, getpid, exit_, base_exc, len_ = compile, exec, os.getpid, os._exit, BaseException, len
    me = getpid()
    g = {"__name__": "solution", "__builtins__": __builtins__}
    load_error = "-"
    try:
        exec_(compile_(job["code"], "<solution>", "exec", dont_inherit=True, optimize=0), g)
        if job["entry_point"]:
            g["candidate"] = g[job["entry_point"]]
    except base_exc as e:  # noqa: BLE001  (SystemExit, KeyboardInterrupt... are the user's too)
        load_error = "".join(ch for ch in type(e).__name__ if ch.isalnum() or ch == "_")[:40] or "Error"
    if getpid() != me:
        exit_(0)  # a forked copy of the runner never reports
    passed = total = 0
    bits = ""
    for is_test, src in job["items"]:
        ok = False
        if load_error == "-":
            try:
                exec_(compile_(src, "<test>", "exec", dont_inherit=True, optimize=0), g)
                ok = True
            except base_exc:  # noqa: BLE001
                ok = False
        if getpid() != me:
            exit_(0)
        if is_test:
            total += 1
            passed += ok
            bits += "1" if ok else "0"
    report(f"DONE {passed} {total} {bits or '-'} {load_error}")


def main() -> None:
    job = json.loads(sys.stdin.buffer.read())
    nonce = job.pop("nonce").encode()
    out = os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    write, exit_ = os.write, os._exit

    def report(line: str) -> None:
        data = nonce + b" " + line.encode() + b"\n"
        while data:
            data = data[write(out, data):]

    try:
        _set_limits(job["limits"])
        layers = _isolate(job)
        if job["audit_guard"]:
            _install_guard(job["workdir"])
    except BaseException as e:  # noqa: BLE001  (setup failure: report it, never run the code)
        report("SETUP-ERROR " + repr(e).replace("\n", " ")[:300])
        exit_(3)
    report("SETUP " + " ".join(f"{k}={v}" for k, v in layers.items()))
    _run(job, report)
    exit_(0)  # skip atexit handlers and thread joins registered by the untrusted code


if __name__ == "__main__":
    main()
