"""The sandbox holes of issue 17, each with its positive control: every attack in tests/hostile
scores 0 and leaves nothing behind, AND succeeds once the defence it tests is switched off -- so
none of these tests could pass with the defence broken. The no-root branch runs in a helper that
drops to another uid (CI runs as root)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import rewards.sandbox as sandbox_mod
from rewards import RewardError, RewardSet
from rewards.sandbox import Sandbox, SandboxConfig
from tests.test_rewards_sandbox import ADD_TESTS, FAST, HOSTILE, assert_contained, hostile_env, load_hostile  # noqa: F401

ROOT = os.geteuid() == 0
PATCHED_TESTS = ["assert round(add(2, 3)) == 5", "assert abs(add(-1, 1)) == 0"]
CFG = FAST.model_copy(update={"max_files": 200})
HOOK_ONLY = CFG.model_copy(update={"isolate_fs": False, "allow_weak_isolation": True})
NO_FS_DEFENCE = HOOK_ONLY.model_copy(update={"audit_guard": False})
needs_root = pytest.mark.skipif(not ROOT, reason="the controls run the attack under a fresh uid, which needs root")


@pytest.mark.parametrize("name, tests", [("always_equal.py", ADD_TESTS), ("patched_builtins.py", PATCHED_TESTS),
                                         ("exit_in_test.py", ADD_TESTS)])
def test_reward_hacks_score_zero_and_pass_when_the_candidate_judges_itself(name, tests, hostile_env, monkeypatch):
    env, listener, secret = hostile_env
    r = Sandbox(CFG).run(load_hostile(name, env), tests)
    assert r.score == 0.0 and r.strong, r
    monkeypatch.setattr(sandbox_mod, "TEST_ONLY_DISABLED", {"checker"})  # old in-process judging
    control = Sandbox(CFG).run(load_hostile(name, env), tests)
    assert control.score == (0.0 if name == "exit_in_test.py" else 1.0), control  # exiting never paid


def test_the_candidate_never_sees_expected_values():
    # The expected value is a setup constant the checker computes; a solution that reads it from
    # the tests' globals (or any global) finds nothing, while a correct one passes.
    tests = "EXPECTED = 5\nassert add(2, 3) == EXPECTED\nassert add(2, 3) in [EXPECTED, 6]"
    peek = "def add(a, b):\n    import builtins\n    return globals().get('EXPECTED', vars(builtins).get('EXPECTED'))\n"
    assert Sandbox(CFG).run(peek, tests).score == 0.0
    assert Sandbox(CFG).run("def add(a, b):\n    return a + b\n", tests).score == 1.0


@needs_root
@pytest.mark.parametrize("name", ["dir_fd_write.py", "rename_dir_fd.py", "read_outside.py", "many_files.py",
                                  "write_outside.py"])
def test_file_system_attacks_are_contained_and_succeed_without_the_defences(name, hostile_env):
    env, listener, secret = hostile_env
    r = Sandbox(CFG).run(load_hostile(name, env), ADD_TESTS)
    assert r.strong and r.layers["fs"] == "tmpfs-root", r
    assert_contained(r, env, listener, secret)
    if name != "many_files.py":  # the audit hook alone (defence in depth) stops these too
        weak = Sandbox(HOOK_ONLY).run(load_hostile(name, env), ADD_TESTS)
        assert weak.layers["fs"] == "audit-hook"
        assert_contained(weak, env, listener, secret)
    control = Sandbox(NO_FS_DEFENCE).run(load_hostile(name, env), ADD_TESTS)
    assert control.score == 1.0, control  # the attack works where nothing stops it
    assert name in ("read_outside.py", "many_files.py") or Path(env["__OUTSIDE_PATH__"]).exists()


@needs_root
def test_marshal_and_code_objects_are_denied_and_work_without_the_audit_hook(hostile_env):
    env, listener, secret = hostile_env
    r = Sandbox(CFG).run(load_hostile("marshal_code.py", env), ADD_TESTS)
    assert_contained(r, env, listener, secret)
    control = Sandbox(CFG.model_copy(update={"audit_guard": False})).run(load_hostile("marshal_code.py", env), ADD_TESTS)
    assert control.strong and control.score == 1.0, control


TRAINER_DIES = textwrap.dedent('''
    import ctypes, json, os, signal, subprocess, sys, time
    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans come to us
    trainer = subprocess.Popen([sys.executable, "-c", """
    import sys, time
    from concurrent.futures import ThreadPoolExecutor
    import rewards.sandbox as s
    s.TEST_ONLY_DISABLED.update(sys.argv[1:])
    code = open(%r).read()
    pool = ThreadPoolExecutor(1)  # a pool thread starts the sandbox, as in training
    pool.submit(s.Sandbox(s.SandboxConfig(timeout_s=60)).run, code, ["assert add(1, 2) == 3"])
    time.sleep(1.5)
    print("running", flush=True)
    time.sleep(600)
    """, *sys.argv[1:]], stdout=subprocess.PIPE)
    assert trainer.stdout.readline() == b"running\\n"
    trainer.kill()  # the trainer crashes
    trainer.wait()
    def children():
        out = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                stat = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == os.getpid() and stat[0] != "Z":
                out.append(int(pid))
        return out
    time.sleep(2.0)
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                break
        except ChildProcessError:
            break
    survivors = children()
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    print(json.dumps({"survivors": len(survivors)}))
''') % str(HOSTILE / "sleeper.py")


@pytest.mark.parametrize("disabled, survive", [((), False), (("lifeline",), True)])
def test_a_sleeper_dies_with_its_trainer(disabled, survive):
    out = subprocess.run([sys.executable, "-c", TRAINER_DIES, *disabled], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    survivors = json.loads(out.stdout.strip().splitlines()[-1])["survivors"]
    assert (survivors > 0) == survive  # with the lifeline off, the sandbox outlives the trainer


# -- without root ---------------------------------------------------------------------------------
AS_ANOTHER_UID = textwrap.dedent('''
    import ctypes, json, os, sys
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    def mount(src, dst, fs, flags, data=None):
        e = lambda s: None if s is None else os.fsencode(s)
        assert libc.mount(e(src), e(dst), e(fs), flags, e(data)) == 0, (dst, ctypes.get_errno())
    # A private mount namespace where the interpreter is reachable by other uids (pyenv lives in /root).
    assert libc.unshare(0x00020000) == 0
    mount(None, "/", None, 16384 | (1 << 18))
    need = [os.path.realpath(p) for p in (sys.base_prefix, sys.prefix, os.getcwd())]
    fds = {p: os.open(p, os.O_PATH) for p in need}
    for top in sorted({"/" + p.split("/")[1] for p in need}):
        if not os.stat(top).st_mode & 0o001:
            mount("tmpfs", top, "tmpfs", 0, "mode=755")
            for p, fd in fds.items():
                if p.startswith(top + "/"):
                    os.makedirs(p, exist_ok=True)
                    mount(f"/proc/self/fd/{fd}", p, None, 4096 | 16384)
    if sys.argv[1] == "no-userns":  # a user namespace of our own that allows no further ones
        to_parent, to_child = os.pipe(), os.pipe()
        pid = os.fork()
        if pid:
            assert os.read(to_parent[0], 1) == b"u"
            for name in ("uid_map", "gid_map"):
                open(f"/proc/{pid}/{name}", "w").write("0 0 4294967295")
            os.write(to_child[1], b"m")
            sys.exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
        assert libc.unshare(0x10000000) == 0
        os.write(to_parent[1], b"u")
        assert os.read(to_child[0], 1) == b"m"
        open("/proc/sys/user/max_user_namespaces", "w").write("0")
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
    from rewards.sandbox import Sandbox, SandboxConfig
    from rewards import RewardSet, RewardError
    cfg = SandboxConfig(**json.loads(sys.argv[2]))
    out = {}
    for name, code in json.loads(sys.argv[3]).items():
        r = Sandbox(cfg).run(code, ["assert add(2, 3) == 5", "assert add(-1, 1) == 0"])
        out[name] = {"status": r.status, "score": r.score, "layers": r.layers, "detail": r.detail}
    try:
        RewardSet([{"spec": "code", "kwargs": {"sandbox": json.loads(sys.argv[2])}}]).score(
            ["q"], ["def add(a, b):\\n    return a + b\\n"], tests=[["assert add(1, 1) == 2"]])
        out["reward"] = "scored"
    except RewardError as e:
        out["reward"] = str(e)
    print(json.dumps(out))
''')


def _as_another_uid(mode: str, cfg: dict, codes: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", AS_ANOTHER_UID, mode, json.dumps(cfg), json.dumps(codes)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@needs_root
def test_without_root_user_namespaces_give_the_same_isolation(hostile_env):
    env, listener, secret = hostile_env
    codes = {"correct": "def add(a, b):\n    return a + b\n", **{n: load_hostile(n, env) for n in (
        "read_outside.py", "dir_fd_write.py", "always_equal.py", "many_files.py")}}
    out = _as_another_uid("userns", {"timeout_s": 5, "max_files": 200}, codes)
    assert out["correct"]["score"] == 1.0 and out["reward"] == "scored", out
    assert out["correct"]["layers"] == {"net": "netns", "fs": "tmpfs-root", "pid": "pidns", "user": "userns",
                                        "uid": "65534"}
    assert all(out[n]["score"] == 0.0 for n in codes if n != "correct"), out
    assert not Path(env["__OUTSIDE_PATH__"]).exists()


@needs_root
def test_without_root_or_user_namespaces_the_code_reward_refuses_unless_weak_is_allowed(hostile_env):
    env, listener, secret = hostile_env
    codes = {"correct": "def add(a, b):\n    return a + b\n", "read_outside.py": load_hostile("read_outside.py", env),
             "dir_fd_write.py": load_hostile("dir_fd_write.py", env)}
    refused = _as_another_uid("no-userns", {"timeout_s": 5}, codes)
    assert refused["correct"]["status"] == "setup-error"
    msg = refused["reward"]
    assert "\n" not in msg and "allow_weak_isolation: true" in msg and "No space left" in msg, msg
    weak = _as_another_uid("no-userns", {"timeout_s": 5, "allow_weak_isolation": True}, codes)
    assert weak["correct"]["score"] == 1.0 and weak["reward"] == "scored", weak
    assert weak["correct"]["layers"]["fs"] == "audit-hook"
    assert weak["read_outside.py"]["score"] == 0.0 and weak["dir_fd_write.py"]["score"] == 0.0, weak
    assert not Path(env["__OUTSIDE_PATH__"]).exists()


def test_weak_isolation_is_refused_in_one_line_by_the_code_reward():
    rs = RewardSet([{"spec": "code", "kwargs": {"sandbox": {"isolate_fs": False}}}])
    with pytest.raises(RewardError) as e:
        rs.score(["q"], ["def add(a, b):\n    return a + b\n"], tests=[ADD_TESTS])
    assert "\n" not in str(e.value) and "allow_weak_isolation: true" in str(e.value)
