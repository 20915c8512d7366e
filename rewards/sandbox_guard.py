"""Child side of the code sandbox: the in-process audit hook (PEP 578), stdlib only.

Defence in depth under the OS layers of sandbox_ns.py, and the only file-system layer when a run is
allowed weak isolation. It denies:

* new processes, sockets, signals to other processes, ctypes and _posixsubprocess;
* frame, gc and tracing introspection (nothing may reach the runner's state);
* hand-made code: `marshal.loads`/`marshal.load`, code-object construction (`code.__new__`, which
  `code.replace` raises too) and `__code__` assignment. Crafted bytecode can read and write the
  interpreter's memory; the stdlib is then imported from source (sys.pycache_prefix points at an
  empty place, see `install`), so it never needs marshal;
* file access outside the allowed places: reads only in the work dir and the readable roots (the
  stdlib, as sandbox_ns binds them), writes only in the work dir, no directory outside the work dir
  opened as a file descriptor, and no `*_dir_fd` argument at all: paths are judged against the cwd,
  which a directory fd would silently replace.
"""

from __future__ import annotations

import os
import sys

_DENY_EVENTS = frozenset({
    "os.system", "os.exec", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "subprocess.Popen",
    "socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.sendto",
    "sys._current_frames", "sys.settrace", "sys.setprofile", "gc.get_objects", "gc.get_referrers",
    "gc.get_referents", "code.__new__", "marshal.loads", "marshal.load", "cpython._PySys_ClearAuditHooks",
})
_DENY_IMPORTS = {"ctypes", "_ctypes", "_posixsubprocess", "_xxsubinterpreters", "_testcapi", "_testinternalcapi"}
_FRAME_ATTRS = frozenset({"tb_frame", "gi_frame", "cr_frame", "ag_frame", "f_back", "f_locals", "f_globals"})
# write-like events -> positions of their dir_fd arguments (-1 when not given)
_WRITE_EVENTS = {"os.remove": (1,), "os.rename": (2, 3), "os.rmdir": (1,), "os.mkdir": (2,), "os.symlink": (2,),
                 "os.link": (2, 3), "os.chmod": (2,), "os.chown": (3,), "os.truncate": (), "os.utime": (3,),
                 "shutil.rmtree": (), "shutil.copyfile": ()}
_DEVICES = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random")


def install(workdir: str, readable: list[str]) -> None:
    """Add the hook. `readable`: directories (and files) the code may read besides the work dir."""
    root = os.path.realpath(workdir)
    readable = tuple(os.path.realpath(p) for p in readable)
    realpath, join, getcwd, isinstance_, str_, bytes_, fspath, isdir = (
        os.path.realpath, os.path.join, os.getcwd, isinstance, str, bytes, os.fspath, os.path.isdir)
    me = os.getpid()
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    dir_flags = os.O_DIRECTORY | getattr(os, "O_PATH", 0)

    def resolve(path) -> str | None:
        try:
            p = fspath(path)
        except TypeError:
            return None  # a file descriptor: the process only holds its own (and no outside dir)
        if isinstance_(p, bytes_):
            p = p.decode(errors="replace")
        return realpath(join(getcwd(), p))

    def within(full: str, tops) -> bool:
        return any(full == t or full.startswith(t + "/") for t in tops)

    def check_path(event: str, path, writing: bool, opens_dir: bool = False) -> None:
        full = resolve(path)
        if full is None:
            return
        if within(full, (root,)) or full in _DEVICES:
            return
        if writing or opens_dir:
            raise PermissionError(f"sandbox: {event} outside the work dir is not allowed")
        if not within(full, readable):
            raise PermissionError(f"sandbox: reading {full} is not allowed")

    def hook(event: str, args: tuple) -> None:
        if event in _DENY_EVENTS:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "sys._getframe":
            raise ValueError("sandbox: frame access is not allowed")  # ValueError: stdlib tolerates it
        if event == "object.__getattr__" and args[1] in _FRAME_ATTRS:
            raise PermissionError("sandbox: frame access is not allowed")
        if event == "object.__setattr__" and args[1] == "__code__":
            raise PermissionError("sandbox: assigning __code__ is not allowed")
        if event.startswith("ctypes.") or (event == "import" and args[0] in _DENY_IMPORTS):
            raise PermissionError(f"sandbox: {args[0] if event == 'import' else event} is not allowed")
        if event == "open":
            path, mode, flags = args
            writing = (isinstance_(mode, str_) and any(c in mode for c in "wax+")) or (
                isinstance_(flags, int) and flags & write_flags)
            opens_dir = (isinstance_(flags, int) and flags & dir_flags) or (
                isinstance_(path, (str_, bytes_)) and isdir(path))
            check_path("open", path, bool(writing), bool(opens_dir))
        elif event in _WRITE_EVENTS:
            if any(i < len(args) and args[i] not in (-1, None) for i in _WRITE_EVENTS[event]):
                raise PermissionError(f"sandbox: {event} with a directory fd is not allowed")
            for a in args[:2]:
                if isinstance_(a, (str_, bytes_)) or hasattr(a, "__fspath__"):
                    if not (event == "os.symlink" and a is args[0]):  # a link's target is just text
                        check_path(event, a, writing=True)
        elif event in ("os.listdir", "os.scandir"):
            if args and isinstance_(args[0], (str_, bytes_)):
                check_path(event, args[0], writing=False)
        elif event in ("os.kill", "os.killpg"):
            if event == "os.killpg" or args[0] not in (0, me):
                raise PermissionError("sandbox: signalling other processes is not allowed")

    sys.pycache_prefix = os.path.join(root, ".no-pycache")  # imports compile from source: no marshal
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
    _DENY_IMPORTS.add("_signal")
