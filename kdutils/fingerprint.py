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
    bound methods) and everything of the book's own code they reach by name, recursively:
    functions, classes (a method is hashed with its class's source) and the immutable
    constants they name (hashed by value). The book's own code is ``kdutils``, a notebook's cells and any
    module outside the Python installation; installed libraries such as torch are pinned by
    version instead. The source is read from the files, so a module edited under a running
    kernel is fingerprinted as edited: restart the kernel after editing ``kdutils``."""
    found: dict[str, str] = {}
    seen, keep = set(), []   # keep: an id stays unique while its object is alive
    todo = list(objects)
    while todo:
        obj = _unwrap(todo.pop())
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        keep.append(obj)
        if isinstance(obj, nn.Module):
            todo += [type(m) for m in obj.modules()]
            continue
        if not (isinstance(obj, (types.FunctionType, type)) and _is_own(obj)):
            continue
        owner = _owner_class(obj)
        if owner is None or _source_digest(owner) is None:
            digest = _source_digest(obj)
            if digest is not None:
                found[_name(obj, digest)] = digest
        refs, constants = _references(obj)
        found.update(constants)
        todo += refs + ([owner] if owner is not None else [])
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


def watching(fn):
    """Decorator for a wrapper that only watches ``fn`` (counts its calls, interrupts a run)
    and otherwise returns what ``fn`` returns: a run's fingerprint takes the wrapper for ``fn``.
    Any other wrapper of the book's own code is fingerprinted as itself."""
    def mark(wrapper):
        wrapper.__fingerprint__ = fn
        return wrapper
    return mark


def _unwrap(obj):
    """The function behind a partial, a method, a property, a :func:`watching` wrapper or a
    library's decorator (``torch.no_grad()``, ``functools.lru_cache``)."""
    for _ in range(100):   # a chain of wrappers; a cycle stops here
        if getattr(obj, "__fingerprint__", None) is not None and not isinstance(obj, nn.Module):
            obj = obj.__fingerprint__
        elif isinstance(obj, functools.partial):
            obj = obj.func
        elif isinstance(obj, (types.MethodType, staticmethod, classmethod)):
            obj = obj.__func__
        elif isinstance(obj, property):
            obj = obj.fget
        elif hasattr(obj, "__wrapped__") and not isinstance(obj, (nn.Module, type)) and not (
                isinstance(obj, types.FunctionType) and _own_file(obj.__code__.co_filename)):
            obj = obj.__wrapped__
        else:
            break
    return obj


def _owner_class(obj) -> type | None:
    """The class a function is a method of (by its qualified name), if any."""
    path = _qualname(obj).split(".")[:-1]
    if not path or "<locals>" in path or isinstance(obj, type):
        return None
    owner = sys.modules.get(obj.__module__)
    for name in path:
        owner = getattr(owner, name, None)
    return owner if isinstance(owner, type) else None


def _is_own(obj) -> bool:
    module = getattr(obj, "__module__", None) or ""
    if module.split(".")[0] in ("kdutils", "__main__"):   # kdutils wherever it is installed
        return True
    file = (obj.__code__.co_filename if isinstance(obj, types.FunctionType)
            else getattr(sys.modules.get(module), "__file__", None))
    return bool(file) and _own_file(file)


def _own_module(module: types.ModuleType) -> bool:
    file = getattr(module, "__file__", None)
    return module.__name__.split(".")[0] == "kdutils" or (bool(file) and _own_file(file))


def _own_file(file: str) -> bool:
    path = Path(file).resolve()
    return not (str(path).startswith(_LIBRARY_DIRS)
                or {"site-packages", "dist-packages"} & set(path.parts))


def _qualname(obj) -> str:
    """A function's own qualified name (a ``functools.wraps`` wrapper copies its wrapped's)."""
    code = getattr(obj, "__code__", None)
    return getattr(code, "co_qualname", None) or obj.__qualname__


def _name(obj, digest: str = "") -> str:
    name = f"{obj.__module__}.{_qualname(obj)}"
    if obj.__name__ == "<lambda>":   # lambdas share a name: their source tells them apart
        name += f"#{digest[:6]}"
    return name


def _source_digest(obj) -> str | None:
    try:   # a function's own code, not what inspect.unwrap would find behind it
        source = inspect.getsource(obj.__code__ if isinstance(obj, types.FunctionType) else obj)
        text = _normalized_source(textwrap.dedent(source))
    except (OSError, TypeError, SyntaxError, tokenize.TokenError):
        return None   # no source to read (exec, a class in a notebook) or a lambda's fragment
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _normalized_source(source: str) -> str:
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


def _references(obj) -> tuple[list, dict[str, str]]:
    """What a function or class uses by name: the globals, module attributes and closure
    values its code names (the contents of containers among them too), and a class's bases
    and members; and, hashed by value, the constants among them."""
    if isinstance(obj, type):
        return list(obj.__bases__) + list(vars(obj).values()), {}
    names, codes = set(), [obj.__code__]
    while codes:
        code = codes.pop()
        names.update(code.co_names)
        codes += [c for c in code.co_consts if isinstance(c, types.CodeType)]
    names = {n for n in names if not (n.startswith("__") and n.endswith("__"))}   # not __name__
    named = {f"{obj.__module__}.{n}": obj.__globals__[n] for n in names if n in obj.__globals__}
    named.update({f"{obj.__module__}.{_qualname(obj)}:{v}": c.cell_contents
                  for v, c in zip(obj.__code__.co_freevars, obj.__closure__ or ()) if _has_value(c)})
    modules = [v for v in named.values() if isinstance(v, types.ModuleType) and _own_module(v)]
    for module in modules:   # kd.losses.kd_loss: names reached through modules, at any depth
        for n in sorted(names):
            value = getattr(module, n, None)
            if isinstance(value, types.ModuleType):
                if value not in modules and _own_module(value):
                    modules.append(value)
            elif value is not None:
                named[f"{module.__name__}.{n}"] = value
    refs, constants = [], {}
    for name, value in named.items():
        text = _constant_text(value)
        if text is not None:
            constants[name] = hashlib.sha256(text.encode()).hexdigest()[:10]
        else:
            refs += [value] + _contents(value) + [v for c in _contents(value) for v in _contents(c)]
    return refs, constants


_SIMPLE = (bool, int, float, complex, str, bytes, type(None))


def _constant_text(value) -> str | None:
    """A stable text of an immutable constant (numbers, strings, None, and tuples and frozensets
    of them, sorted), else None. Mutable containers hold state (a call counter, a cache), not
    code: their contents are followed but not hashed."""
    if isinstance(value, _SIMPLE):
        return repr(value)
    if isinstance(value, (tuple, frozenset)):
        texts = [_constant_text(v) for v in value]
        if None not in texts:
            return f"{type(value).__name__}({', '.join(sorted(texts) if isinstance(value, frozenset) else texts)})"
    return None


def _contents(value) -> list:
    if isinstance(value, dict):
        return list(value.values())
    return list(value) if isinstance(value, (tuple, list, set, frozenset)) else []


def _has_value(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:   # an empty cell: the variable was never assigned
        return False
    return True
