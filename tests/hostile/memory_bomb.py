# Allocates (and touches) memory without bound. RLIMIT_AS turns this into a MemoryError.
blocks = []
while True:
    blocks.append(bytearray(32 << 20))


def add(a, b):
    return a + b
