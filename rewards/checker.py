"""The trusted checker: test verdicts are computed in the trainer, never by the candidate's process.

`plan_tests` splits every `assert E` of a sample's tests into
  * a skeleton: what the checker evaluates itself -- constants, comparisons, boolean logic,
    arithmetic, indexing, container literals, a few pure builtins (abs, len, sorted, round, ...),
    `math` functions and pure methods of plain values (str.lower, dict.items, ...); and
  * leaves: the parts that need the candidate (calls to its functions, names the test setup or the
    solution binds), which the sandbox evaluates and sends back as plain data (sandbox_runner.py).
So `abs(f(x) - y) < 1e-6` ships only f(x) (and y unless the checker knows it) and the checker does
the subtraction, abs and comparison on plain values: forged `__eq__`, patched builtins and early
exits score 0. Setup assignments whose value the checker can compute (`EXPECTED = [1, 2]`) are
evaluated here and sent to the sandbox only if a leaf needs them, so expected values stay out of
the candidate's process. Asserts inside loops or other compound statements work the same way,
once per execution, with the names the statement binds treated as leaves.

`judge` turns the sandbox's untrusted messages into (passed, total, bits). Work on forged values
is bounded (no huge repetitions, powers or ranges); anything unexpected fails that assertion.
"""

from __future__ import annotations

import ast
import math
import operator
from dataclasses import dataclass, field
from typing import Any

RECORD = "__deepalign_record__"
LIMIT = 1_000_000  # elements/characters any checker operation may produce
_MATH = {n: getattr(math, n) for n in (
    "isclose", "sqrt", "floor", "ceil", "fabs", "isnan", "isinf", "isfinite", "log", "log2", "log10", "exp",
    "trunc", "gcd", "hypot", "copysign", "pi", "e", "inf", "nan", "tau", "sin", "cos", "tan", "atan2")}


def _range(*args):
    r = range(*args)
    if len(r) > LIMIT:
        raise OverflowError("range too long")
    return r


def _pow(a, b, *mod):
    if not mod and isinstance(a, int) and isinstance(b, int) and b > 0 and a.bit_length() * b > 8 * LIMIT:
        raise OverflowError("power too large")
    return pow(a, b, *mod)


_SAFE_FUNCS = {f.__name__: f for f in (
    abs, all, any, bool, chr, dict, divmod, enumerate, float, frozenset, int, isinstance, len, list, max, min, ord,
    repr, reversed, round, set, sorted, str, sum, tuple, type, zip)} | {"range": _range, "pow": _pow,
                                                                        "bytes": bytes, "NoneType": type(None)}
_METHODS = {
    str: {"lower", "upper", "strip", "lstrip", "rstrip", "split", "rsplit", "startswith", "endswith", "count", "find",
          "rfind", "index", "rindex", "join", "isdigit", "isalpha", "isalnum", "isspace", "isupper", "islower",
          "isnumeric", "isdecimal", "title", "capitalize", "casefold", "swapcase", "splitlines", "partition",
          "rpartition", "encode"},
    bytes: {"decode", "hex", "startswith", "endswith", "count", "find", "split", "strip"},
    list: {"count", "index"}, tuple: {"count", "index"},
    dict: {"keys", "values", "items", "get"}, set: {"issubset", "issuperset", "union", "intersection", "difference"},
    frozenset: {"issubset", "issuperset", "union", "intersection", "difference"},
    float: {"is_integer"}, int: {"bit_length"},
}
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: _pow, ast.BitAnd: operator.and_,
           ast.BitOr: operator.or_, ast.BitXor: operator.xor, ast.LShift: operator.lshift,
           ast.RShift: operator.rshift}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg, ast.Not: operator.not_, ast.Invert: operator.invert}
_CMP = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt,
        ast.GtE: operator.ge, ast.Is: operator.is_, ast.IsNot: operator.is_not,
        ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b}


class CheckError(Exception):
    """An assertion cannot be evaluated on the values received: it fails."""


@dataclass
class TestPlan:
    items: list[tuple[str, str]]  # (kind: setup | test, source) as the sandbox runs them
    raw_items: list[tuple[str, str]]  # the original sources (test-only raw mode)
    skeletons: dict[int, tuple[int, ast.expr, int]] = field(default_factory=dict)  # id -> (item, expr, leaves)
    env: dict[str, Any] = field(default_factory=dict)  # trusted names (setup constants, math aliases)
    env_at: dict[int, dict[str, Any]] = field(default_factory=dict)  # id -> the trusted names there


class _Splitter:
    """Builds one assertion's skeleton; leaves become `__leaf_<k>` names."""

    def __init__(self, trusted: frozenset[str], shadowed: set[str], math_names: set[str]):
        self.trusted, self.shadowed, self.math_names, self.leaves = trusted, shadowed, math_names, []

    def leaf(self, node: ast.expr) -> ast.Name:
        self.leaves.append(node)
        return ast.Name(id=f"__leaf_{len(self.leaves) - 1}", ctx=ast.Load())

    def safe_name(self, name: str) -> bool:
        return name in self.trusted or (name in _SAFE_FUNCS and name not in self.shadowed)

    def __call__(self, node: ast.expr) -> ast.expr:  # noqa: PLR0911
        s = self
        if isinstance(node, ast.Constant):
            return node
        if isinstance(node, ast.Name):
            return node if s.safe_name(node.id) else s.leaf(node)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in s.math_names \
                and node.attr in _MATH:
            return ast.Name(id=f"__math_{node.attr}", ctx=ast.Load())
        if isinstance(node, ast.Call) and not any(isinstance(a, ast.Starred) for a in node.args) \
                and all(k.arg for k in node.keywords):
            f = node.func
            if isinstance(f, ast.Name) and s.safe_name(f.id):
                func = f
            elif isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id in s.math_names \
                    and f.attr in _MATH:
                func = ast.Name(id=f"__math_{f.attr}", ctx=ast.Load())
            elif isinstance(f, ast.Attribute) and any(f.attr in m for m in _METHODS.values()):
                func = ast.Attribute(value=s(f.value), attr=f.attr, ctx=ast.Load())
            else:
                return s.leaf(node)
            return ast.Call(func=func, args=[s(a) for a in node.args],
                            keywords=[ast.keyword(arg=k.arg, value=s(k.value)) for k in node.keywords])
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and not any(isinstance(e, ast.Starred) for e in node.elts):
            return type(node)(elts=[s(e) for e in node.elts], **({"ctx": ast.Load()} if hasattr(node, "ctx") else {}))
        if isinstance(node, ast.Dict) and None not in node.keys:
            return ast.Dict(keys=[s(k) for k in node.keys], values=[s(v) for v in node.values])
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return ast.BinOp(left=s(node.left), op=node.op, right=s(node.right))
        if isinstance(node, ast.UnaryOp):
            return ast.UnaryOp(op=node.op, operand=s(node.operand))
        if isinstance(node, ast.BoolOp):
            return ast.BoolOp(op=node.op, values=[s(v) for v in node.values])
        if isinstance(node, ast.Compare):
            return ast.Compare(left=s(node.left), ops=node.ops, comparators=[s(c) for c in node.comparators])
        if isinstance(node, ast.IfExp):
            return ast.IfExp(test=s(node.test), body=s(node.body), orelse=s(node.orelse))
        if isinstance(node, ast.Subscript):
            return ast.Subscript(value=s(node.value), slice=s(node.slice), ctx=ast.Load())
        if isinstance(node, ast.Slice):
            return ast.Slice(*(None if p is None else s(p) for p in (node.lower, node.upper, node.step)))
        return s.leaf(node)


def _bound_names(node: ast.AST) -> set[str]:
    """Names a statement may bind (assignment targets, loop variables, defs, imports, ...)."""
    names = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del)):
            names.add(n.id)
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(n.name)
        elif isinstance(n, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in n.names)
        elif isinstance(n, ast.ExceptHandler) and n.name:
            names.add(n.name)
        elif isinstance(n, ast.arg):
            names.add(n.arg)
    return names


def plan_tests(items: list[tuple[bool, str]]) -> TestPlan:
    """Rewrite split_tests() items for the sandbox; see the module docstring."""
    plan = TestPlan(items=[], raw_items=[("test" if t else "setup", src) for t, src in items])
    shadowed: set[str] = set()  # names the sandbox side binds (never the checker's builtins then)
    math_names: set[str] = set()
    trusted_setup: dict[int, str] = {}  # item index -> name it defines (dropped if no leaf needs it)

    def constant(value: ast.expr) -> tuple[bool, Any]:
        split = _Splitter(frozenset(plan.env), shadowed, math_names)
        skeleton = split(value)
        if split.leaves:
            return False, None
        try:
            return True, evaluate(skeleton, plan.env, [])
        except Exception:  # noqa: BLE001  (the sandbox computes it, as for any other setup)
            return False, None

    for index, (is_test, src) in enumerate(items):
        module = ast.parse(src)
        if not is_test:
            stmt = module.body[0] if len(module.body) == 1 else None
            if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
                ok, value = constant(stmt.value)
                if ok:
                    plan.env[stmt.targets[0].id] = value
                    shadowed.discard(stmt.targets[0].id)
                    trusted_setup[index] = stmt.targets[0].id
                    plan.items.append(("setup", src))
                    continue
            for n in ast.walk(module):
                if isinstance(n, ast.Import):
                    math_names.update(a.asname or a.name for a in n.names if a.name == "math")
                elif isinstance(n, ast.ImportFrom) and n.module == "math":
                    plan.env.update({a.asname or a.name: _MATH[a.name] for a in n.names if a.name in _MATH})
            bound = _bound_names(module) - math_names
            bound -= {a.asname or a.name for n in ast.walk(module) if isinstance(n, ast.ImportFrom)
                      and n.module == "math" for a in n.names if a.name in _MATH}
            for name in bound:
                plan.env.pop(name, None)
            shadowed |= bound
            plan.items.append(("setup", src))
            continue
        local = _bound_names(module)
        trusted = frozenset(plan.env) - local

        class Rewrite(ast.NodeTransformer):
            def visit_Assert(self, node: ast.Assert) -> ast.stmt:  # noqa: N802
                split = _Splitter(trusted, shadowed | local, math_names - local)
                skeleton = split(node.test)
                aid = len(plan.skeletons)
                plan.skeletons[aid] = (index, skeleton, len(split.leaves))
                plan.env_at[aid] = {k: v for k, v in plan.env.items() if k in trusted}
                thunks = ast.Tuple(elts=[ast.Lambda(args=ast.arguments(posonlyargs=[], args=[], kwonlyargs=[],
                                                                       kw_defaults=[], defaults=[]), body=leaf)
                                         for leaf in split.leaves], ctx=ast.Load())
                call = ast.Call(func=ast.Name(id=RECORD, ctx=ast.Load()), args=[ast.Constant(aid), thunks],
                                keywords=[])
                return ast.copy_location(ast.Expr(value=call), node)

        rewritten = ast.fix_missing_locations(Rewrite().visit(module))
        plan.items.append(("test", ast.unparse(rewritten)))
        for name in local:
            plan.env.pop(name, None)
        shadowed |= local
    # A trusted constant travels to the sandbox only when sandbox code reads it (as an input).
    read = {n.id for i, (_, src) in enumerate(plan.items) if i not in trusted_setup
            for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    for index, name in trusted_setup.items():
        if name not in read:
            plan.items[index] = ("setup", "pass")
    return plan


# -- evaluation ------------------------------------------------------------------------------------
class _Error:
    """A leaf whose evaluation raised in the sandbox (or was not plain data)."""

    def __init__(self, what: str):
        self.what = what


def decode(value: Any, depth: int = 0) -> Any:
    """The runner's JSON encoding -> plain Python values (see sandbox_runner.py)."""
    if depth > 60:
        raise CheckError("too deeply nested")
    if value is None or type(value) in (bool, int, float, str):
        return value
    if type(value) is list:
        return [decode(v, depth + 1) for v in value]
    if type(value) is dict and len(value) == 1:
        (tag, body), = value.items()
        if tag == "t" and type(body) is list:
            return tuple(decode(v, depth + 1) for v in body)
        if tag == "d" and type(body) is list:
            if not all(type(p) is list and len(p) == 2 for p in body):
                raise CheckError("malformed dict")
            return {decode(k, depth + 1): decode(v, depth + 1) for k, v in body}
        if tag == "b" and type(body) is str:
            return bytes.fromhex(body)
        if tag == "e" and type(body) is str:
            return _Error(body)
    raise CheckError("not plain data")


def _size(x: Any) -> int:
    return len(x) if isinstance(x, (str, bytes, list, tuple)) else 1


def evaluate(node: ast.expr, env: dict[str, Any], leaves: list[Any]) -> Any:  # noqa: PLR0911, PLR0912
    """Evaluate a skeleton on plain values with bounded work; CheckError (or any error) fails it."""
    ev = lambda n: evaluate(n, env, leaves)  # noqa: E731
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        if node.id.startswith("__leaf_"):
            value = leaves[int(node.id[7:])]
            if isinstance(value, _Error):
                raise CheckError(value.what)
            return value
        if node.id.startswith("__math_"):
            return _MATH[node.id[7:]]
        if node.id in env:
            return env[node.id]
        return _SAFE_FUNCS[node.id]
    if isinstance(node, ast.Attribute):
        obj = ev(node.value)
        if type(obj) not in _METHODS or node.attr not in _METHODS[type(obj)]:
            raise CheckError(f"{type(obj).__name__}.{node.attr} is not allowed")
        return getattr(obj, node.attr)
    if isinstance(node, ast.Call):
        func = ev(node.func)
        args = [ev(a) for a in node.args]
        kwargs = {k.arg: ev(k.value) for k in node.keywords}
        if func is bytes and args and isinstance(args[0], int) and args[0] > LIMIT:
            raise CheckError("too large")
        return func(*args, **kwargs)
    if isinstance(node, ast.BinOp):
        a, b = ev(node.left), ev(node.right)
        op = type(node.op)
        if op is ast.Mult and ((isinstance(a, int) and _size(b) * max(a, 0) > LIMIT)
                               or (isinstance(b, int) and _size(a) * max(b, 0) > LIMIT)):
            raise CheckError("repetition too large")
        if op is ast.LShift and isinstance(b, int) and b > 8 * LIMIT:
            raise CheckError("shift too large")
        if op is ast.Mod and isinstance(a, (str, bytes)):
            raise CheckError("%-formatting is not allowed")
        return _BINOPS[op](a, b)
    if isinstance(node, ast.UnaryOp):
        return _UNARY[type(node.op)](ev(node.operand))
    if isinstance(node, ast.BoolOp):
        result = None
        for v in node.values:
            result = ev(v)
            if isinstance(node.op, ast.And) and not result or isinstance(node.op, ast.Or) and result:
                return result
        return result
    if isinstance(node, ast.Compare):
        left = ev(node.left)
        for op, comp in zip(node.ops, node.comparators):
            right = ev(comp)
            if not _CMP[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.IfExp):
        return ev(node.body) if ev(node.test) else ev(node.orelse)
    if isinstance(node, ast.Subscript):
        return ev(node.value)[ev(node.slice)]
    if isinstance(node, ast.Slice):
        return slice(*(None if p is None else ev(p) for p in (node.lower, node.upper, node.step)))
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return {ast.Tuple: tuple, ast.List: list, ast.Set: set}[type(node)](ev(e) for e in node.elts)
    if isinstance(node, ast.Dict):
        return {ev(k): ev(v) for k, v in zip(node.keys, node.values)}
    raise CheckError(f"{type(node).__name__} is not evaluated by the checker")


def judge(plan: TestPlan, messages: list[dict], raw: bool = False) -> tuple[int, int, str]:
    """(passed, total, per-test bits) from the sandbox's item messages (untrusted)."""
    by_item = {m.get("item"): m for m in messages if type(m.get("item")) is int}
    bits = ""
    for index, (kind, _) in enumerate(plan.items):
        if kind != "test":
            continue
        msg = by_item.get(index)
        bits += "1" if msg is not None and msg.get("ok") is True and (raw or _records_hold(plan, index, msg)) else "0"
    return bits.count("1"), len(bits), bits


def _records_hold(plan: TestPlan, index: int, msg: dict) -> bool:
    records = msg.get("records")
    if type(records) is not list:
        return False
    for rec in records:
        try:
            aid, values = rec
            item, skeleton, n_leaves = plan.skeletons[aid]
            if item != index or type(values) is not list or len(values) != n_leaves:
                return False
            if not bool(evaluate(skeleton, plan.env_at[aid], [decode(v) for v in values])):
                return False
        except Exception:  # noqa: BLE001  (forged or broken records fail the test)
            return False
    return True
