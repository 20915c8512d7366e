# Hangs inside the function under test (not at import): only the wall-clock timeout stops it.
def add(a, b):
    while True:
        pass
