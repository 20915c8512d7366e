"""Child side of the code sandbox: Linux namespaces and the private file system (stdlib only).

Used by sandbox_child.py before any untrusted code exists. The design, in the order it is applied:

* PID namespace. The watcher process (sandbox_child's main, "P") unshares CLONE_NEWPID, so its next
  child ("X") is pid 1 of a fresh namespace: SIGKILL of X kills and reaps everything in it. Without
  root, P first enters a user namespace of its own (mapping only its own uid), which owns the PID
  namespace. X sets PR_SET_PDEATHSIG(SIGKILL) on P: P is single-threaded, so the parent-death signal
  really means "P died" (in a thread pool it would fire when the spawning *thread* exits).
* User namespace. X unshares CLONE_NEWUSER with mount, network and IPC namespaces; P (still outside)
  writes X's uid/gid maps: inside, X is uid 1000; outside it is a fresh random uid as root (so
  RLIMIT_NPROC binds and a kill-by-uid sweep finds strays) or the trainer's own uid otherwise. X then
  forbids nested user namespaces (max_user_namespaces=0 in its namespace) and, once in its root,
  drops every capability: the code runs without privilege even inside its namespace.
* File system. P, in a mount namespace of its own (it can still reach everything), stages a new
  root (`stage_root`): a small read-only tmpfs holding read-only bind mounts of only what the
  interpreter needs (its stdlib, /usr and the /lib* dirs for shared libraries, /etc/ld.so.cache,
  /dev/null, /dev/zero, /dev/urandom), and the work dir: a second tmpfs at /tmp bounded in bytes
  (size=) and in files (nr_inodes=), so no completion can fill the disk or RAM with one big file
  or many small ones. X pivots into it (`enter_root`) and detaches the old root, so everything
  else is unreachable, even by a chroot escape: the trainer's working directory, home,
  checkpoints. The work dir is the only writable place; there is no /proc and no /sys.
  (Binding has to happen in P: the kernel refuses bind sources from another mount namespace,
  and the fresh uid may not traverse e.g. /root to the interpreter.)
"""

from __future__ import annotations

import ctypes
import os
import sys

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER = 0x00020000, 0x08000000, 0x10000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME = 1024, 2048, 4096, 16384, 1 << 18, 1 << 21
MNT_DETACH, PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 2, 1, 38
SYS_PIVOT_ROOT = 155  # x86_64 (aarch64: 41, chosen in enter_root)
INNER_ID = 1000  # the code's uid/gid inside its user namespace
WORKDIR = "/tmp"  # inside the new root
_ST_TO_MS = ((1, MS_RDONLY), (2, MS_NOSUID), (4, MS_NODEV), (8, MS_NOEXEC), (1024, MS_NOATIME),
             (2048, MS_NODIRATIME), (4096, MS_RELATIME))  # statvfs f_flag bit -> mount flag

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.syscall.restype = ctypes.c_long


class NamespaceError(OSError):
    """A namespace or mount step failed (the kernel or its configuration does not allow it)."""


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise NamespaceError(err, f"{what}: {os.strerror(err)}")


def unshare(flags: int, what: str) -> None:
    _check(_libc.unshare(flags), what)


def mount(src, target, fstype, flags: int, data=None) -> None:
    enc = lambda s: None if s is None else os.fsencode(s)  # noqa: E731
    _check(_libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def set_pdeathsig() -> None:
    """SIGKILL this process when its (single-threaded) parent dies. A parent that died before this
    call is noticed by the caller: its sync pipe reaches EOF (getppid() cannot tell, it reads 0
    for the pid 1 of a new namespace either way)."""
    _check(_libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0), "prctl(PDEATHSIG)")


def write_maps(pid: int | str, outer_uid: int, outer_gid: int, inner: int) -> None:
    """One-line uid/gid maps for `pid`'s user namespace (setgroups denied first, as unprivileged
    writers must)."""
    for name, text in (("setgroups", "deny"), ("uid_map", f"{inner} {outer_uid} 1"),
                       ("gid_map", f"{inner} {outer_gid} 1")):
        with open(f"/proc/{pid}/{name}", "w") as f:
            f.write(text)


def enter_own_user_namespace() -> None:
    """Unprivileged: a user namespace mapping only our own ids, so we may create a PID namespace."""
    uid, gid = os.geteuid(), os.getegid()
    unshare(CLONE_NEWUSER, "unshare(user namespace)")
    write_maps("self", uid, gid, uid)


def forbid_nested_user_namespaces() -> None:
    with open("/proc/sys/user/max_user_namespaces", "w") as f:
        f.write("0")


def _bind_ro(src: str, target: str) -> None:
    """Read-only bind mount, keeping the flags the kernel locks on mounts from a parent namespace."""
    if os.path.isdir(src):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "a").close()
    mount(src, target, None, MS_BIND | MS_REC)
    st = os.statvfs(src).f_flag
    kept = sum(ms for bit, ms in _ST_TO_MS if st & bit)
    mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | kept)


def readable_roots() -> list[str]:
    """What the code may read: the interpreter's stdlib (realpath of its sys.path) and library dirs."""
    keep = {os.path.realpath(p) for p in sys.path if os.path.isdir(p)}
    base_lib = os.path.realpath(os.path.join(sys.base_prefix, "lib"))
    if os.path.isdir(base_lib):
        keep.add(base_lib)  # libpython and any shared library the installation bundles
    for d in ("/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/etc/ld.so.cache"):
        if os.path.exists(d) and not os.path.islink(d):
            keep.add(d)
    keep = sorted(keep)
    return [p for p in keep if not any(p != q and p.startswith(q + os.sep) for q in keep)]


def stage_root(new_root: str, disk_mb: int, max_files: int) -> None:
    """In a fresh mount namespace of the watcher (which can still reach everything): a read-only
    tmpfs at `new_root` with read-only binds of readable_roots() and the few devices, and the
    bounded, writable tmpfs that becomes the work dir (WORKDIR once entered)."""
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    mount("tmpfs", new_root, "tmpfs", MS_NOSUID | MS_NODEV, "size=4m,nr_inodes=4096,mode=755")
    for path in readable_roots():
        _bind_ro(path, new_root + path)
    for top in ("/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin"):
        if os.path.islink(top):  # merged /usr: keep the symlinks
            os.symlink(os.readlink(top), new_root + top)
    for dev in ("null", "zero", "urandom", "random"):
        if os.path.exists(f"/dev/{dev}"):
            os.makedirs(f"{new_root}/dev", exist_ok=True)
            open(f"{new_root}/dev/{dev}", "a").close()
            mount(f"/dev/{dev}", f"{new_root}/dev/{dev}", None, MS_BIND)
            mount(None, f"{new_root}/dev/{dev}", None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID)
    os.makedirs(new_root + WORKDIR)
    mount("tmpfs", new_root + WORKDIR, "tmpfs", MS_NOSUID | MS_NODEV,
          f"size={disk_mb}m,nr_inodes={max_files + 2},mode=1777")  # +2: its root dir, pivot_root's old root
    mount(None, new_root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, "size=4m,nr_inodes=4096,mode=755")


def enter_root(new_root: str) -> None:
    """In the code's own user+mount namespace: pivot into the staged root, detach the old one."""
    mount(new_root, new_root, None, MS_BIND | MS_REC)  # a mount of our own: the staged one is locked
    old = new_root + WORKDIR + "/.old"
    os.makedirs(old)
    nr = SYS_PIVOT_ROOT if os.uname().machine == "x86_64" else 41
    _check(_libc.syscall(nr, os.fsencode(new_root), os.fsencode(old)), "pivot_root")
    os.chdir("/")
    _check(_libc.umount2(os.fsencode(WORKDIR + "/.old"), MNT_DETACH), "umount old root")
    os.rmdir(WORKDIR + "/.old")
    os.chdir(WORKDIR)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def drop_capabilities() -> None:
    """No capabilities left (effective, permitted, inheritable), and none to gain by exec."""
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
    header, data = _CapHeader(0x20080522, 0), (_CapData * 2)()
    _check(_libc.capset(ctypes.byref(header), data), "capset")
