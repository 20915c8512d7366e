# Moves a file it made in its work dir to outside through directory fds (os.rename with
# src_dir_fd/dst_dir_fd): relative names that look like they stay in the cwd.
import os

TARGET = "__OUTSIDE_PATH__"
moved = False
try:
    open("local", "w").write("pwned")
    here = os.open(".", os.O_RDONLY)
    there = os.open(os.path.dirname(TARGET), os.O_RDONLY)
    os.rename("local", os.path.basename(TARGET), src_dir_fd=here, dst_dir_fd=there)
    moved = os.path.exists(TARGET)
except Exception:
    pass


def add(a, b):
    return a + b if moved else None
