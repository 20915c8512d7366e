# Tries to reach a server the test listens on at 127.0.0.1; `add` only works if it got through.
import os
import socket

PORT = __PORT__
reached = False
try:
    with socket.create_connection(("127.0.0.1", PORT), timeout=1) as s:
        s.sendall(b"leak")
        reached = True
except Exception:
    pass
try:
    reached |= os.system(f"bash -c 'echo leak > /dev/tcp/127.0.0.1/{PORT}'") == 0
except Exception:
    pass


def add(a, b):
    return a + b if reached else None
