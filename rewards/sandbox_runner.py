"""Child side of the code sandbox: the process that runs the untrusted solution (stdlib only).

It never judges anything. The tests arrive rewritten by rewards/checker.py: every `assert E` became
`__deepalign_record__(id, (lambda: leaf_0, ...))`, where the leaves are the parts of E that need the
candidate (calls, names); the comparison itself stays with the trusted checker in the trainer. Each
leaf value is sent back as plain data -- exactly int, float, str, bytes, bool, None, and list, tuple,
dict of those (checked with `type(v) is ...`, so subclasses and objects with a forged `__eq__` are
refused) -- serialised by this module's own writer, never by code the candidate could patch. The
process holds neither the expected values nor any secret: the trainer treats everything it reports
as untrusted data.

The tests run in their own globals with a snapshot of the builtins taken before the solution ran,
so a solution that patches `builtins` (or its own `__builtins__`) changes nothing for the tests.
Messages (one JSON object per line on the result fd): {"load": "-" | "ErrorName"}, then per test
item {"item": i, "ok": completed, "records": [[id, [leaf, ...]], ...]}, then {"done": true}.
"""

from __future__ import annotations

import builtins
import os

from _json import encode_basestring_ascii as _quote

MAX_RECORDS = 10_000  # per test item; more fails the item (a loop over a huge iterable)
MAX_NODES = 100_000  # per leaf value
_PLAIN_SCALARS = (int, float, str, bytes, bool, type(None))


class NotPlain(Exception):
    pass


def _make_encoder():
    """Bind everything the encoder uses now, before any untrusted code can rebind it."""
    type_, id_, int_repr, float_repr, str_, bytes_hex = type, id, int.__repr__, float.__repr__, str, bytes.hex
    list_, tuple_, dict_, bool_, none, float_, int_, bytes_ = list, tuple, dict, bool, type(None), float, int, bytes
    inf = float("inf")

    def encode(value) -> str:
        budget = [MAX_NODES]

        def enc(v, depth: int) -> str:
            budget[0] -= 1
            if budget[0] < 0 or depth > 50:
                raise NotPlain("too large or too deeply nested")
            t = type_(v)
            if t is none:
                return "null"
            if t is bool_:
                return "true" if v else "false"
            if t is int_:
                return int_repr(v)
            if t is float_:
                if v != v:
                    return "NaN"
                if v in (inf, -inf):
                    return "Infinity" if v > 0 else "-Infinity"
                return float_repr(v)
            if t is str_:
                return _quote(v)
            if t is bytes_:
                return '{"b":"' + bytes_hex(v) + '"}'
            if t is list_:
                return "[" + ",".join([enc(x, depth + 1) for x in v]) + "]"
            if t is tuple_:
                return '{"t":[' + ",".join([enc(x, depth + 1) for x in v]) + "]}"
            if t is dict_:
                pairs = [f"[{enc(k, depth + 1)},{enc(x, depth + 1)}]" for k, x in v.items()]
                return '{"d":[' + ",".join(pairs) + "]}"
            raise NotPlain(f"{t.__name__} is not plain data")

        return enc(value, 0)

    return encode


def _error(e: BaseException) -> str:
    name = "".join(ch for ch in type(e).__name__ if ch.isalnum() or ch == "_")[:40] or "Error"
    return '{"e":' + _quote(name) + "}"


def run(job: dict, write_line) -> None:
    """Exec the solution, then every test item; see the module docstring for the protocol."""
    # Capture everything used after the untrusted code starts: it may rebind builtins/modules.
    compile_, exec_, getpid, exit_, base_exc, len_, quote = compile, exec, os.getpid, os._exit, BaseException, len, _quote
    int_, str_, enumerate_, not_plain, error, max_records = int, str, enumerate, NotPlain, _error, MAX_RECORDS
    encode = _make_encoder()
    clean_builtins = dict(builtins.__dict__)
    me = getpid()
    raw = job["mode"] == "raw"  # test-only: old in-process judging (positive controls)
    g = {"__name__": "solution", "__builtins__": builtins.__dict__ if raw else dict(clean_builtins)}
    load_error = "-"
    try:
        exec_(compile_(job["code"], "<solution>", "exec", dont_inherit=True, optimize=0), g)
        if job["entry_point"]:
            g["candidate"] = g[job["entry_point"]]
    except base_exc as e:  # noqa: BLE001  (SystemExit, KeyboardInterrupt... are the user's too)
        load_error = "".join(ch for ch in type(e).__name__ if ch.isalnum() or ch == "_")[:40] or "Error"
    if getpid() != me:
        exit_(0)  # a forked copy of the runner never reports
    write_line('{"load":' + quote(load_error) + "}")
    if load_error != "-":
        return
    records: list[str] = []

    def record(assert_id: int, thunks) -> None:
        if len_(records) >= max_records:
            raise OverflowError("too many assertions")
        values = []
        for thunk in thunks:
            try:
                values.append(encode(thunk()))
            except not_plain as e:
                values.append('{"e":' + quote(str_(e)[:80]) + "}")
            except base_exc as e:  # noqa: BLE001
                values.append(error(e))
        records.append(f"[{int_(assert_id)},[{','.join(values)}]]")

    tg = g if raw else {**g, "__builtins__": dict(clean_builtins), "__deepalign_record__": record}
    for i, (kind, src) in enumerate_(job["items"]):
        records.clear()
        try:
            exec_(compile_(src, "<test>", "exec", dont_inherit=True, optimize=0), tg)
            ok = True
        except base_exc:  # noqa: BLE001
            ok = False
        if getpid() != me:
            exit_(0)
        if kind == "test":
            write_line(f'{{"item":{i},"ok":{"true" if ok else "false"},"records":[{",".join(records)}]}}')
    write_line('{"done":true}')
