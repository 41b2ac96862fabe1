"""Reading a pickle without running it: the classes it names and the plain values it holds.

``pickle.load`` imports and calls whatever the file names, so a model pickle from
an untrusted bucket must never reach it. :func:`walk` interprets the opcode
stream (``pickletools.genops`` parses it; nothing is imported) on a symbolic
stack: classes and functions stay :class:`Global` names, calls stay :class:`Obj`
records, persistent ids (PyTorch storages) stay :class:`Pid`. Every limit is
explicit — bytes read, opcodes, items held — so a hostile file (truncated,
huge lengths, recursion bombs, cycles) ends as a partial result, quickly and in
bounded memory.
"""

from __future__ import annotations

import pickletools
from dataclasses import dataclass, field
from typing import Any, BinaryIO

MAX_BYTES = 64 << 20  # the part of a pickle that is read
MAX_OPS = 2_000_000
MAX_ITEMS = 1_000_000  # values held on the stack, in the memo and in containers
MAX_BYTES_KEPT = 256  # longer byte strings are kept as their length only


@dataclass(frozen=True)
class Global:
    module: str
    name: str

    def __str__(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass(eq=False)
class Obj:
    """The result of calling ``cls`` (REDUCE, NEWOBJ, INST, OBJ), and the state BUILD gave it."""
    cls: Any
    args: Any = None
    state: Any = None


@dataclass(frozen=True)
class Pid:
    value: Any


@dataclass(frozen=True)
class Blob:
    size: int  # a byte string (or out-of-band buffer) too long to keep


@dataclass
class Walk:
    top: Any = None  # what the pickle returns (None if it did not get that far)
    calls: list[Obj] = field(default_factory=list)  # every call, in order
    complete: bool = False
    note: str | None = None  # why the walk stopped early


class _Stop(Exception):
    pass


_MARK = object()


def walk(f: BinaryIO, max_bytes: int = MAX_BYTES) -> Walk:
    """Interpret the pickle at ``f``'s position; never raises for bad input."""
    data = f.read(max_bytes)
    out = Walk()
    stack: list[Any] = []
    memo: dict[int, Any] = {}
    items = 0
    try:
        for n, (op, arg, _) in enumerate(pickletools.genops(data)):
            if n >= MAX_OPS:
                raise _Stop(f"more than {MAX_OPS} opcodes")
            items += 1
            if items > MAX_ITEMS:
                raise _Stop(f"more than {MAX_ITEMS} values")
            items += _step(op.name, arg, stack, memo, out)
            if op.name == "STOP":
                out.top = stack[-1] if stack else None
                out.complete = True
                break
    except _Stop as e:
        out.note = str(e)
    except (ValueError, IndexError, KeyError, TypeError, AttributeError, EOFError) as e:
        out.note = f"unreadable pickle at opcode {len(out.calls)}: {type(e).__name__}: {e}"[:200]
    if not out.complete and out.note is None:
        out.note = "truncated" if len(data) < max_bytes else f"longer than {max_bytes} bytes"
    return out


def _pop_mark(stack: list[Any]) -> list[Any]:
    for i in range(len(stack) - 1, -1, -1):
        if stack[i] is _MARK:
            items = stack[i + 1:]
            del stack[i:]
            return items
    raise ValueError("no MARK on the stack")


def _keep(v: Any) -> Any:
    if isinstance(v, (bytes, bytearray)) and len(v) > MAX_BYTES_KEPT:
        return Blob(len(v))
    return v


def _step(name: str, arg: Any, stack: list[Any], memo: dict[int, Any], out: Walk) -> int:
    """One opcode; returns how many values it added to containers (for the item limit)."""
    if name in ("PROTO", "FRAME", "STOP"):
        return 0
    if name == "MARK":
        stack.append(_MARK)
    elif name in ("NONE", "NEWTRUE", "NEWFALSE") or arg is not None and name not in _WITH_ARG:
        stack.append({"NONE": None, "NEWTRUE": True, "NEWFALSE": False}.get(name, _keep(arg)))
    elif name in ("EMPTY_LIST",):
        stack.append([])
    elif name == "EMPTY_DICT":
        stack.append({})
    elif name == "EMPTY_TUPLE":
        stack.append(())
    elif name == "EMPTY_SET":
        stack.append([])
    elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
        k = int(name[-1])
        if len(stack) < k:
            raise ValueError("stack underflow")
        t = tuple(stack[-k:])
        del stack[-k:]
        stack.append(t)
    elif name == "TUPLE":
        stack.append(tuple(_pop_mark(stack)))
    elif name == "LIST":
        stack.append(_pop_mark(stack))
    elif name == "FROZENSET":
        stack.append(_pop_mark(stack))
    elif name == "DICT":
        xs = _pop_mark(stack)
        stack.append(_dict(xs))
    elif name == "APPEND":
        v = stack.pop()
        if isinstance(stack[-1], list):
            stack[-1].append(v)
        return 1
    elif name in ("APPENDS", "ADDITEMS"):
        xs = _pop_mark(stack)
        if isinstance(stack[-1], list):
            stack[-1].extend(xs)
        return len(xs)
    elif name == "SETITEM":
        v, k = stack.pop(), stack.pop()
        if isinstance(stack[-1], dict):
            _put(stack[-1], k, v)
        return 1
    elif name == "SETITEMS":
        xs = _pop_mark(stack)
        if isinstance(stack[-1], dict):
            for i in range(0, len(xs) - 1, 2):
                _put(stack[-1], xs[i], xs[i + 1])
        return len(xs)
    elif name == "GLOBAL":
        module, _, attr = str(arg).partition(" ")
        stack.append(Global(module, attr))
    elif name == "STACK_GLOBAL":
        attr, module = stack.pop(), stack.pop()
        stack.append(Global(str(module), str(attr)))
    elif name in ("EXT1", "EXT2", "EXT4"):
        stack.append(Global("copyreg-extension", str(arg)))
    elif name == "REDUCE":
        args, fn = stack.pop(), stack.pop()
        stack.append(_call(out, fn, args))
    elif name == "NEWOBJ":
        args, cls = stack.pop(), stack.pop()
        stack.append(_call(out, cls, args))
    elif name == "NEWOBJ_EX":
        _, args, cls = stack.pop(), stack.pop(), stack.pop()
        stack.append(_call(out, cls, args))
    elif name == "INST":
        module, _, attr = str(arg).partition(" ")
        stack.append(_call(out, Global(module, attr), tuple(_pop_mark(stack))))
    elif name == "OBJ":
        xs = _pop_mark(stack)
        if not xs:
            raise ValueError("OBJ without a class")
        stack.append(_call(out, xs[0], tuple(xs[1:])))
    elif name == "BUILD":
        state = stack.pop()
        if isinstance(stack[-1], Obj):
            stack[-1].state = state
    elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
        memo[int(arg)] = stack[-1]
        return 1
    elif name == "MEMOIZE":
        memo[len(memo)] = stack[-1]
        return 1
    elif name in ("GET", "BINGET", "LONG_BINGET"):
        stack.append(memo[int(arg)])
    elif name == "PERSID":
        stack.append(Pid(arg))
    elif name == "BINPERSID":
        stack.append(Pid(stack.pop()))
    elif name == "POP":
        stack.pop()
    elif name == "POP_MARK":
        _pop_mark(stack)
    elif name == "DUP":
        stack.append(stack[-1])
    elif name in ("NEXT_BUFFER",):
        stack.append(Blob(0))
    elif name == "READONLY_BUFFER":
        pass
    else:
        raise ValueError(f"unsupported opcode {name}")
    return 0


# opcodes whose argument is not a value to push
_WITH_ARG = {"GLOBAL", "INST", "PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET",
             "PERSID", "EXT1", "EXT2", "EXT4", "PROTO", "FRAME"}


_DICTS = {Global("collections", "OrderedDict"), Global("builtins", "dict"), Global("__builtin__", "dict")}


def _call(out: Walk, fn: Any, args: Any) -> Obj | dict:
    if fn in _DICTS:  # a mapping its SETITEMS fill (PyTorch state dicts are OrderedDicts)
        return {}
    o = Obj(fn, args)
    out.calls.append(o)
    return o


def _put(d: dict, k: Any, v: Any) -> None:
    try:
        d[k] = v
    except TypeError:  # an unhashable symbolic key (a list, an Obj): keep it by identity
        d[f"<{type(k).__name__} {id(k):x}>"] = v


def _dict(xs: list[Any]) -> dict:
    d: dict = {}
    for i in range(0, len(xs) - 1, 2):
        _put(d, xs[i], xs[i + 1])
    return d


def plain(v: Any, depth: int = 0) -> Any:
    """``v`` if it is a plain value (number, short string, bool, None, or a small list/tuple
    of those), else None: what may be shown of a parameter."""
    if v is None or isinstance(v, (bool, int, float)):
        return v
    if isinstance(v, str):
        return v if len(v) <= 200 else v[:200] + "…"
    if isinstance(v, (list, tuple)) and depth == 0 and len(v) <= 16:
        vals = [plain(x, 1) for x in v]
        return vals if all(x is not None or y is None for x, y in zip(vals, v)) else None
    return None
