# Creates a file outside the work dir through a directory fd: os.open(name, O_CREAT, dir_fd=fd)
# (the audit event carries no dir_fd, and a path check against the cwd sees only "name").
import os

TARGET = "__OUTSIDE_PATH__"
made = False
try:
    fd = os.open(os.path.dirname(TARGET), os.O_RDONLY)
    os.close(os.open(os.path.basename(TARGET), os.O_WRONLY | os.O_CREAT, dir_fd=fd))
    made = os.path.exists(TARGET)
except Exception:
    pass


def add(a, b):
    return a + b if made else None
