"""The book builds from the committed outputs, with every warning treated as an error."""
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_book_builds_without_warnings(built_book):
    html, proc = built_book
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    html = html / "book"
    for nb in sorted((ROOT / "book").glob("*.ipynb")):
        assert (html / f"{nb.stem}.html").is_file(), nb.name


def test_committed_notebooks_show_real_runs_without_errors():
    for nb_path in sorted((ROOT / "book").glob("*.ipynb")):
        nb = json.loads(nb_path.read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        outputs = [o for c in code for o in c.get("outputs", [])]
        assert not [o for o in outputs if o.get("output_type") == "error"], nb_path.name
        text = json.dumps(outputs)
        assert "profile=smoke" not in text, f"{nb_path.name} carries outputs of a smoke run"
