"""The layout of kdutils, checked on its source with ``ast`` (nothing is imported).

Each check takes the package's folder and returns its offenders (empty: OK), so that the
``test_checks_detect_*`` tests can show it failing on a tiny fake package.
``python tests/test_layout.py`` prints the package's size and every check's result.
"""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "kdutils"
OUTER = ("book", "tools")  # the subpackages that the core must not import
MAX_FUNCTION_LINES, MAX_FIT_PARAMETERS, MAX_FINGERPRINT_LINES = 60, 12, 150


# --- Reading the package -----------------------------------------------------------------

def modules(root: Path) -> dict[str, Path]:
    """Every module under ``root`` by dotted name; a package's ``__init__.py`` is the package."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def where(root: Path, path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(root.parent)}:{node.lineno}"


def resolve(node: ast.ImportFrom, name: str, path: Path) -> str:
    """The absolute module of ``from MODULE import ...`` written in module ``name``."""
    if not node.level:
        return node.module
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    return ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))


def imported(node: ast.Import | ast.ImportFrom, name: str, path: Path) -> set[str]:
    """What an import may load: the module, and ``module.alias`` for each alias (maybe a submodule)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    base = resolve(node, name, path)
    return {base} | {f"{base}.{alias.name}" for alias in node.names}


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def ancestors(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def module_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """The imports run when the module is imported: not in functions, not under ``if TYPE_CHECKING:``."""
    found, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            todo.extend(node.orelse)
        elif not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            todo.extend(child for child in ast.iter_child_nodes(node)
                        if isinstance(child, (ast.stmt, ast.excepthandler, ast.match_case)))
    return sorted(found, key=lambda node: node.lineno)


def functions(root: Path):
    """(path, node) for every function and method under ``root``, nested ones included."""
    for path in modules(root).values():
        yield from ((path, node) for node in ast.walk(parse(path))
                    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)))


def length(fn: ast.AST) -> int:
    return fn.end_lineno - fn.lineno + 1  # from the ``def`` line: decorators excluded


def fit_of(root: Path) -> ast.FunctionDef | None:
    path = root / "train.py"
    fits = [n for n in parse(path).body if getattr(n, "name", "") == "fit"] if path.exists() else []
    return fits[0] if fits else None


def parameter_count(fn: ast.FunctionDef) -> int:
    a = fn.args
    return len(a.posonlyargs + a.args + a.kwonlyargs) + bool(a.vararg) + bool(a.kwarg)


def used_names(tree: ast.AST) -> set[str]:
    """The names a module uses: ``ast.Name`` ids (attribute bases too), string annotations included."""
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    notes = [getattr(n, key, None) for n in ast.walk(tree) for key in ("annotation", "returns")]
    for text in {c.value for note in filter(None, notes) for c in ast.walk(note)
                 if isinstance(c, ast.Constant) and isinstance(c.value, str)}:
        try:
            used |= used_names(ast.parse(text, mode="eval"))
        except SyntaxError:
            pass
    return used


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of ``graph`` as a closed chain [a, b, ..., a], or [] if there is none."""
    done, chain = set(), []

    def visit(node):
        if node in chain:
            return chain[chain.index(node):] + [node]
        if node not in done:
            chain.append(node)
            for cycle in map(visit, sorted(graph[node])):
                if cycle:
                    return cycle
            done.add(chain.pop())
        return []

    return next(filter(None, map(visit, sorted(graph))), [])


# --- The checks: each returns its offenders ----------------------------------------------

def core_imports_of_outer(root: Path) -> list[str]:
    """Imports, anywhere in a core module (``root/*.py``), of ``book`` or ``tools``."""
    outer, offenders = [f"{root.name}.{sub}" for sub in OUTER], []
    for name, path in modules(root).items():
        if path.parent != root:
            continue
        nodes = [n for n in ast.walk(parse(path)) if isinstance(n, (ast.Import, ast.ImportFrom))]
        offenders += [f"{where(root, path, n)} {ast.unparse(n)}" for n in nodes
                      if any(within(m, o) for m in imported(n, name, path) for o in outer)]
    return offenders


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the package's modules its module-level imports load, their parent packages
    included, but not its own ancestors (a package's ``__init__`` imports its submodules)."""
    known, graph = modules(root), {}
    for name, path in known.items():
        loaded = {m for n in module_level_imports(parse(path)) for m in imported(n, name, path)}
        loaded |= {a for m in loaded for a in ancestors(m)}
        graph[name] = {m for m in loaded if m in known and m != name} - ancestors(name)
    return graph


def import_cycles(root: Path) -> list[str]:
    cycle = find_cycle(import_graph(root))
    return [" -> ".join(cycle)] if cycle else []


def long_functions(root: Path) -> list[str]:
    return [f"{where(root, path, fn)} {fn.name}: {length(fn)} lines"
            for path, fn in functions(root) if length(fn) > MAX_FUNCTION_LINES]


def fit_parameters(root: Path) -> list[str]:
    fit = fit_of(root)
    if fit is None or parameter_count(fit) > MAX_FIT_PARAMETERS:
        return [f"fit in train.py: {parameter_count(fit) if fit else 'not found'} parameters"]
    return []


def fingerprint_size(root: Path) -> list[str]:
    """fingerprint.py's length; without it, no ``code_fingerprint`` may be left anywhere."""
    path = root / "fingerprint.py"
    if path.exists():
        lines = len(path.read_text(encoding="utf-8").splitlines())
        return [f"{path.name}: {lines} lines"] if lines > MAX_FINGERPRINT_LINES else []
    return [f"{where(root, p, fn)} code_fingerprint without fingerprint.py"
            for p, fn in functions(root) if fn.name == "code_fingerprint"]


def reexports(root: Path) -> list[str]:
    """Module-level ``from <package module> import name`` left unused (kept for re-export);
    a package's ``__init__`` may import its submodules and nothing else from the package."""
    known, offenders = modules(root), []
    for name, path in known.items():
        tree = parse(path)
        used = used_names(tree)
        for node in module_level_imports(tree):
            base = resolve(node, name, path) if isinstance(node, ast.ImportFrom) else ""
            if not within(base, root.name):
                continue
            if path.name == "__init__.py":
                bad = [a.name for a in node.names if f"{base}.{a.name}" not in known]
            else:
                bad = [a.asname or a.name for a in node.names if (a.asname or a.name) not in used]
            offenders += [f"{where(root, path, node)} {ast.unparse(node)}  ({', '.join(bad)})"] if bad else []
    return offenders


CHECKS = {"core imports nothing from book or tools": core_imports_of_outer,
          "no import cycle": import_cycles,
          f"no function over {MAX_FUNCTION_LINES} lines": long_functions,
          f"fit takes at most {MAX_FIT_PARAMETERS} parameters": fit_parameters,
          f"fingerprint within {MAX_FINGERPRINT_LINES} lines": fingerprint_size,
          "no re-export facade": reexports}


# --- The tests on the package ------------------------------------------------------------

def assert_none(offenders: list[str]):
    assert not offenders, "\n".join(offenders)


def test_core_imports_nothing_from_book_or_tools():
    assert_none(core_imports_of_outer(PACKAGE))


def test_no_import_cycle():
    assert_none(import_cycles(PACKAGE))


def test_no_function_over_60_lines():
    assert_none(long_functions(PACKAGE))


def test_fit_takes_at_most_12_parameters():
    assert_none(fit_parameters(PACKAGE))


def test_fingerprint_within_150_lines():
    assert_none(fingerprint_size(PACKAGE))


def test_no_reexport_facade():
    assert_none(reexports(PACKAGE))


# --- Each check catches a tiny bad package -------------------------------------------------

def fake(tmp_path: Path, files: dict[str, str]) -> Path:
    """A package ``pkg`` in ``tmp_path`` made of ``files`` (path: source)."""
    for rel, source in {"__init__.py": "", "train.py": "def fit(a):\n    pass\n", **files}.items():
        (tmp_path / "pkg" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "pkg" / rel).write_text(source)
    return tmp_path / "pkg"


@pytest.mark.parametrize("bad, line", [("from .book import plots", 2), ("from . import tools", 2),
                                       ("from pkg import book", 2), ("def f():\n    import pkg.tools.x", 3),
                                       ("from .tools.chooser import y", 2)])
def test_checks_detect_core_importing_book_or_tools(tmp_path, bad, line):
    root = fake(tmp_path, {"data.py": f"from .bookish import z\n{bad}\n",
                           "book/x.py": "from ..data import x\n"})
    assert [o.split()[0] for o in core_imports_of_outer(root)] == [f"pkg/data.py:{line}"]


def test_checks_detect_import_cycle(tmp_path):
    root = fake(tmp_path, {"__init__.py": "from . import a, book\n", "a.py": "from .book.b import f\n",
                           "book/__init__.py": "from . import b\n",
                           "book/b.py": "if True:\n    from .. import a\n",  # a cycle
                           "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.d\n",
                           "d.py": "from . import c\n"})  # no cycle: TYPE_CHECKING
    assert import_cycles(root) == ["pkg.a -> pkg.book -> pkg.book.b -> pkg.a"]
    (root / "book/b.py").write_text("def g():\n    from .. import a\n")
    assert import_cycles(root) == []


def test_checks_detect_long_function(tmp_path):
    body = "".join(f"        x = {i}\n" for i in range(60))
    root = fake(tmp_path, {"tools/m.py": f"class C:\n    @staticmethod\n    def f():\n{body}"})
    assert long_functions(root) == ["pkg/tools/m.py:3 f: 61 lines"]


def test_checks_detect_fit_with_many_parameters(tmp_path):
    root = fake(tmp_path, {"train.py": "def fit(a, /, b, *c, d, e, f, g, h, i, j, k, m, **l):\n    pass\n"})
    assert fit_parameters(root) == ["fit in train.py: 13 parameters"]


def test_checks_detect_long_or_orphan_fingerprint(tmp_path):
    root = fake(tmp_path, {"fingerprint.py": "x = 1\n" * 151})
    assert fingerprint_size(root) == ["fingerprint.py: 151 lines"]
    (root / "fingerprint.py").unlink()
    (root / "runs.py").write_text("def code_fingerprint():\n    pass\n")
    assert fingerprint_size(root) == ["pkg/runs.py:1 code_fingerprint without fingerprint.py"]


def test_checks_detect_reexport(tmp_path):
    root = fake(tmp_path, {"__init__.py": "from . import a, b\nfrom .a import f\n",
                           "a.py": "def f(x: 'C'): pass\n",
                           "b.py": "from .a import f  # noqa: F401\nfrom .c import C, D\nx: 'list[C]'\nD.y\n",
                           "c.py": "C = D = 1\n"})
    assert reexports(root) == ["pkg/__init__.py:2 from .a import f  (f)",
                               "pkg/b.py:1 from .a import f  (f)"]


# --- The size table ----------------------------------------------------------------------

def main(root: Path = PACKAGE):
    """Print the package's size per folder and every check's result."""
    lines = {p: len(p.read_text(encoding="utf-8").splitlines()) for p in modules(root).values()}
    print(f"{'folder':8}{'modules':>8}{'lines':>8}{'share':>7}  longest function")
    for folder in ("core", *OUTER):
        paths = sorted(root.glob("*.py")) if folder == "core" else sorted((root / folder).rglob("*.py"))
        n = sum(lines[p] for p in paths)
        fns = [(length(fn), f"{fn.name} in {where(root, p, fn)}") for p, fn in functions(root) if p in paths]
        longest = "{1} ({0} lines)".format(*max(fns)) if fns else "-"
        print(f"{folder:8}{len(paths):8}{n:8}{n / sum(lines.values()):7.0%}  {longest}")
    fit = fit_of(root)
    print(f"\nfit: {parameter_count(fit) if fit else 'not found'} parameters; "
          f"fingerprint.py: {lines.get(root / 'fingerprint.py', 'no file')} lines\n")
    for title, check in CHECKS.items():
        offenders = check(root)
        print(f"{title}: {'OK' if not offenders else f'{len(offenders)} offender(s)'}")
        print("".join(f"    {o}\n" for o in offenders), end="")


if __name__ == "__main__":
    main()
