# Fills the disk with many small files (RLIMIT_FSIZE bounds one file, not their number);
# `add` works only if it created more than __MAX_FILES__ of them.
import os

created = 0
try:
    os.makedirs("fill", exist_ok=True)
    for i in range(3 * __MAX_FILES__):
        with open(f"fill/{i}", "w") as f:
            f.write("x")
        created += 1
except OSError:
    pass


def add(a, b):
    return a + b if created > __MAX_FILES__ else None
