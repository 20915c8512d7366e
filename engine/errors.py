"""The engine's one error type, importable without Ray (the CLI catches it to print one line)."""


class EngineError(RuntimeError):
    """The engine cannot go on (an actor died, a call timed out, resources never appeared)."""
