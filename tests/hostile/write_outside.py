# Tries every way to create a file outside its work dir; `add` only works if one succeeded.
import os

TARGET = "__OUTSIDE_PATH__"
MARKER = "__MARKER_PATH__"  # in the real /tmp, which is world-writable


def attempts(path):
    yield lambda: open(path, "w").write("pwned")
    yield lambda: os.close(os.open(path, os.O_WRONLY | os.O_CREAT))
    yield lambda: os.system(f"echo pwned > {path}")
    yield lambda: __import__("subprocess").run(["sh", "-c", f"echo pwned > {path}"], check=True)
    yield lambda: (os.symlink(path, "link"), open("link", "w").write("pwned"))
    yield lambda: os.rename(open("local", "w").name, path)


for p in (TARGET, MARKER):
    for attempt in attempts(p):
        try:
            attempt()
        except Exception:
            pass


def add(a, b):
    return a + b if os.path.exists(TARGET) or os.path.exists(MARKER) else None
