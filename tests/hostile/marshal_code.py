# Runs hand-made code objects: marshal.loads of bytecode, code.replace and __code__ assignment.
# Real attacks craft bytecode that reads or writes the interpreter's memory; here any of the three
# succeeding makes `add` correct.
import marshal


def add(a, b):
    return None


def real(a, b):
    return a + b


for attempt in (
    lambda: setattr(add, "__code__", marshal.loads(marshal.dumps(real.__code__))),
    lambda: setattr(add, "__code__", real.__code__.replace()),
    lambda: setattr(add, "__code__", real.__code__),
):
    try:
        attempt()
    except Exception:
        pass
