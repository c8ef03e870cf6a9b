"""What code a run ran: a hash of the source of its loss step, its teacher targets and its
model's classes, and of every function or class of the book's own code they use (chapter 2).

A run's key hashes its names and parameters, so editing ``kd_step`` keeps the key. The
fingerprint is saved beside it, in the checkpoint and the record; a checkpoint whose
fingerprint differs from the code about to run is trained again instead of reloaded.
Comments, docstrings and blank lines are left out, so they can change freely.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import io
import sys
import sysconfig
import textwrap
import tokenize
import types
from pathlib import Path

from torch import nn

_LIBRARY_DIRS = tuple({str(Path(sysconfig.get_paths()[k]).resolve())
                       for k in ("stdlib", "platstdlib", "purelib", "platlib")})


def code_fingerprint(*objects) -> dict[str, str]:
    """``{qualified name: hash}`` for each of ``objects`` (functions, classes, models, partials,
    bound methods) and everything of the book's own code they reach by name, recursively.
    The book's own code is ``kdutils``, a notebook's cells and any module outside the Python
    installation (installed libraries such as torch are pinned by version instead)."""
    found: dict[str, str] = {}
    seen: set[int] = set()
    todo = list(objects)
    while todo:
        obj = _unwrap(todo.pop())
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, nn.Module):
            todo += [type(m) for m in obj.modules()]
            continue
        if not (isinstance(obj, (types.FunctionType, type)) and _is_own(obj)):
            continue
        owner = _owner_class(obj)
        if owner is not None and id(owner) not in seen:
            todo += [obj, owner]   # a method: its class's source holds it (class first)
            seen.discard(id(obj))
            continue
        digest = _source_digest(obj) if owner is None else None
        if digest is not None:
            found[f"{obj.__module__}.{obj.__qualname__}"] = digest
        todo += _references(obj)
    return dict(sorted(found.items()))


def changed(recorded: dict[str, str] | None, current: dict[str, str]) -> list[str]:
    """The names whose code differs between a checkpoint's fingerprint and the current one
    (added or removed names included); empty when they agree or the checkpoint has none."""
    if recorded is None:   # written before fingerprints existed: nothing to compare
        return []
    return sorted(n for n in recorded.keys() | current.keys() if recorded.get(n) != current.get(n))


def is_stale(recorded: dict[str, str] | None, current: dict[str, str] | None, name: str) -> bool:
    """Whether a checkpoint (``name``) with fingerprint ``recorded`` was made by other code than
    ``current``; if so, prints a line naming what changed. ``current`` None: not checked."""
    stale = changed(recorded, current) if current is not None else []
    if stale:
        print(f"{name} was trained by other code ({', '.join(stale)} changed since): "
              "training again from the first epoch")
    return bool(stale)


def _unwrap(obj):
    """The function behind a partial, a method, a property or a wrapper made with
    ``functools.wraps`` (a wrapper that only watches, e.g. counts calls, changes no result)."""
    while True:
        if hasattr(obj, "__wrapped__") and not isinstance(obj, nn.Module):
            obj = obj.__wrapped__
        elif isinstance(obj, functools.partial):
            obj = obj.func
        elif isinstance(obj, (types.MethodType, staticmethod, classmethod)):
            obj = obj.__func__
        elif isinstance(obj, property):
            obj = obj.fget
        else:
            return obj


def _owner_class(obj) -> type | None:
    """The class a function is a method of (by its qualified name), if any."""
    path = obj.__qualname__.split(".")[:-1]
    if not path or "<locals>" in path or isinstance(obj, type):
        return None
    owner = sys.modules.get(obj.__module__)
    for name in path:
        owner = getattr(owner, name, None)
    return owner if isinstance(owner, type) else None


def _is_own(obj) -> bool:
    module = getattr(obj, "__module__", None) or ""
    if module == "kdutils" or module.startswith("kdutils.") or module == "__main__":
        return True
    file = getattr(sys.modules.get(module), "__file__", None)
    return bool(file) and not str(Path(file).resolve()).startswith(_LIBRARY_DIRS)


def _source_digest(obj) -> str | None:
    try:
        source = textwrap.dedent(inspect.getsource(obj))
    except (OSError, TypeError):   # no source to read (e.g. defined through exec)
        return None
    return hashlib.sha256(_tokens(source).encode()).hexdigest()[:10]


def _tokens(source: str) -> str:
    """The source without comments, docstrings, blank lines and trailing spaces: two sources
    that differ only in those give the same text (on every Python version: the text is cut
    from the source, not rebuilt from tokens, whose kinds changed in Python 3.12)."""
    starts = [0]
    for line in source.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))
    offset = lambda pos: starts[pos[0] - 1] + pos[1]  # noqa: E731 (row, col) -> index
    cuts, line_start, depth = [], True, 0
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        quote = min(i for i in (tok.string.find("'"), tok.string.find('"'), len(tok.string))
                    if i >= 0)
        if tok.type == tokenize.COMMENT or (tok.type == tokenize.STRING and line_start
                                            and not set(tok.string[:quote].lower()) & {"f", "b"}):
            cuts.append((offset(tok.start), offset(tok.end)))   # a comment or a docstring
        if tok.type == tokenize.OP:
            depth += (tok.string in "([{") - (tok.string in ")]}")
        if tok.type != tokenize.COMMENT:   # a line holding only a comment leaves it as it was
            line_start = tok.type in (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT) or (
                tok.type == tokenize.NL and depth == 0)
    kept, at = [], 0
    for a, b in cuts:
        kept.append(source[at:a])
        at = b
    kept.append(source[at:])
    lines = (line.rstrip() for line in "".join(kept).splitlines())
    return "\n".join(line for line in lines if line.strip())


def _references(obj) -> list:
    """What a function or class uses by name: the globals, module attributes and closure
    values its code names, and a class's bases and members."""
    if isinstance(obj, type):
        return list(obj.__bases__) + list(vars(obj).values())
    names, codes = set(), [obj.__code__]
    while codes:
        code = codes.pop()
        names.update(code.co_names)
        codes += [c for c in code.co_consts if isinstance(c, types.CodeType)]
    refs = [obj.__globals__[n] for n in names if n in obj.__globals__]
    refs += [c.cell_contents for c in obj.__closure__ or () if _has_value(c)]
    refs += list((obj.__kwdefaults__ or {}).values()) + list(obj.__defaults__ or ())
    modules = [r for r in refs if isinstance(r, types.ModuleType)]
    for module in modules:   # kd.losses.kd_loss: names reached through modules, at any depth
        for value in (getattr(module, n) for n in names if hasattr(module, n)):
            if isinstance(value, types.ModuleType):
                if value not in modules:
                    modules.append(value)
            else:
                refs.append(value)
    return refs


def _has_value(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:   # an empty cell: the variable was never assigned
        return False
    return True
