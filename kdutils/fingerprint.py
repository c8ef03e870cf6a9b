"""What code a run ran (chapter 2): hashes of its step, teacher targets and model classes and of
the book's own code they use, saved beside its key, so that a checkpoint made by other code
trains again. Sources compare as parsed (``ast``): comments, docstrings, layout may change."""
import ast
import functools
import hashlib
import inspect
import sys
import sysconfig
import textwrap
import types
from pathlib import Path

from torch import nn

_LIBRARY_DIRS = tuple({str(Path(sysconfig.get_paths()[k]).resolve())
                       for k in ("stdlib", "platstdlib", "purelib", "platlib")})


def code_fingerprint(*objects) -> dict[str, str]:
    """``{qualified name: hash}`` of ``objects`` (functions, classes, models, partials) and the own
    code they reach by name (``kdutils``, notebooks, modules outside the Python installation)."""
    found, seen, todo = {}, {}, list(objects)   # seen keeps what it saw alive: ids stay unique
    while todo:
        obj = _unwrap(todo.pop())
        if obj is None or id(obj) in seen:
            continue
        seen[id(obj)] = obj
        if isinstance(obj, nn.Module):
            todo += [type(m) for m in obj.modules()]
        elif isinstance(obj, (types.FunctionType, type)) and _is_own(obj):
            # its code's own qualified name (functools.wraps copies the wrapped's __qualname__)
            qualname = getattr(getattr(obj, "__code__", None), "co_qualname", obj.__qualname__)
            parts = qualname.split(".")   # a method counts with its class
            digest = None if len(parts) > 1 and parts[-2] != "<locals>" else _digest(obj)
            if digest is not None:
                name = f"{obj.__module__}.{qualname}"
                found[name + (f"#{digest[:6]}" if obj.__name__ == "<lambda>" else "")] = digest
            refs, constants = _references(obj)
            found.update(constants)
            todo += refs
    return dict(sorted(found.items()))


def changed(recorded: dict[str, str] | None, current: dict[str, str]) -> list[str]:
    """The names whose code differs (added or removed too); none if ``recorded`` is None."""
    return sorted(n for n in (recorded or {}).keys() | current.keys()
                  if recorded is not None and recorded.get(n) != current.get(n))


def is_stale(recorded: dict[str, str] | None, current: dict[str, str] | None, name: str) -> bool:
    """Whether checkpoint ``name`` was made by other code than ``current``; says what changed."""
    stale = changed(recorded, current) if current is not None else []
    if stale:
        print(f"{name} was trained by other code ({', '.join(stale)} changed since): "
              "training again from the first epoch")
    return bool(stale)


def watching(fn):
    """Mark a wrapper that only watches ``fn`` (counts calls, interrupts): it fingerprints as ``fn``."""
    return lambda wrapper: setattr(wrapper, "__fingerprint__", fn) or wrapper


def _unwrap(obj):
    """The function behind a partial, method, property, watching wrapper or library decorator."""
    for _ in range(100):
        if getattr(obj, "__fingerprint__", None) is not None and not isinstance(obj, nn.Module):
            obj = obj.__fingerprint__
        elif isinstance(obj, types.MethodType):   # a bound method: its class
            obj = obj.__self__ if isinstance(obj.__self__, type) else type(obj.__self__)
        elif isinstance(obj, (functools.partial, staticmethod, classmethod, property)):
            obj = getattr(obj, "func", None) or getattr(obj, "__func__", None) or obj.fget
        elif (hasattr(obj, "__wrapped__") and not isinstance(obj, (nn.Module, type))
              and not (isinstance(obj, types.FunctionType) and _is_own(obj.__code__.co_filename))):
            obj = obj.__wrapped__
        else:
            return obj
    return obj


def _is_own(obj) -> bool:
    """Whether a function, class, module or file is the book's own code, not a library's."""
    if isinstance(obj, str):
        path = Path(obj).resolve()
        return not (str(path).startswith(_LIBRARY_DIRS) or {"site-packages", "dist-packages"} & set(path.parts))
    is_module = isinstance(obj, types.ModuleType)
    name = obj.__name__ if is_module else getattr(obj, "__module__", None) or ""
    file = (obj.__code__.co_filename if isinstance(obj, types.FunctionType)
            else getattr(obj if is_module else sys.modules.get(name), "__file__", None))
    return name.split(".")[0] in ("kdutils", "__main__") or bool(file) and _is_own(file)


def _digest(obj) -> str | None:
    """A hash of the source as parsed, without docstrings; None without source; an error if its file changed since."""
    code = obj.__code__ if isinstance(obj, types.FunctionType) else obj
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(code)))
    except (OSError, TypeError, SyntaxError):   # exec'd code, a class in a notebook, a fragment
        return None
    if getattr(tree.body[0], "name", "<lambda>") not in (getattr(code, "co_name", obj.__name__), "<lambda>"):
        raise RuntimeError(f"{inspect.getsourcefile(code)} changed since this process imported it: restart it")
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list):   # a string alone as a statement is a docstring
            body[:] = [s for s in body if not (isinstance(s, ast.Expr) and isinstance(
                getattr(s, "value", None), ast.Constant) and isinstance(s.value.value, str))] or [ast.Pass()]
    return hashlib.sha256(ast.unparse(tree).encode()).hexdigest()[:10]


def _references(obj) -> tuple[list, dict[str, str]]:
    """What a function uses by name (globals, closure values, attributes of own modules, and
    containers' contents) or a class has (bases, members); and the constants among them."""
    if isinstance(obj, type):
        return list(obj.__bases__) + list(vars(obj).values()), {}
    names, codes = set(), [obj.__code__]
    while codes:
        code = codes.pop()
        names.update(n for n in code.co_names if not (n.startswith("__") and n.endswith("__")))
        codes += [c for c in code.co_consts if isinstance(c, types.CodeType)]
    named = {f"{obj.__module__}.{n}": obj.__globals__[n] for n in names if n in obj.__globals__}
    for var, cell in zip(obj.__code__.co_freevars, obj.__closure__ or ()):
        try:
            named[f"{obj.__module__}.{obj.__qualname__}:{var}"] = cell.cell_contents
        except ValueError:   # an empty cell: the variable was never assigned
            pass
    modules = [v for v in named.values() if isinstance(v, types.ModuleType) and _is_own(v)]
    for module in modules:   # kd.losses.kd_loss: names reached through modules, at any depth
        for n in sorted(names):
            value = getattr(module, n, None)
            if isinstance(value, types.ModuleType):
                modules += [value] if value not in modules and _is_own(value) else []
            elif value is not None:
                named[f"{module.__name__}.{n}"] = value
    texts = {name: _constant_text(value) for name, value in named.items()}
    refs = [r for name, v in named.items() if texts[name] is None
            for r in (v, *_contents(v), *(w for c in _contents(v) for w in _contents(c)))]
    return refs, {n: hashlib.sha256(t.encode()).hexdigest()[:10] for n, t in texts.items() if t is not None}


def _constant_text(value) -> str | None:
    """The text of an immutable constant or a tuple of them, else None (mutables hold state)."""
    if isinstance(value, tuple):
        return None if None in map(_constant_text, value) else repr(value)
    return repr(value) if isinstance(value, (bool, int, float, complex, str, bytes, type(None))) else None


def _contents(value) -> list:
    return list(value.values() if isinstance(value, dict)
                else value if isinstance(value, (tuple, list, set, frozenset)) else ())
