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


def test_every_chapter_installs_kdutils_on_colab_from_the_configured_repository():
    """The repository's address lives in ``_config.yml``; each chapter's Colab line must
    install from exactly that address and branch (one line per chapter, nothing else)."""
    import yaml
    repo = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]
    expected = f'%pip install -q "kdutils @ git+{repo["url"]}@{repo["branch"]}"'
    for nb_path in sorted((ROOT / "book").glob("*.ipynb")):
        nb = json.loads(nb_path.read_text())
        lines = [line.strip() for c in nb["cells"] if c["cell_type"] == "code"
                 for line in "".join(c["source"]).splitlines() if "pip install" in line]
        assert lines == [expected], f"{nb_path.name}: {lines}"
        text = json.dumps([c["source"] for c in nb["cells"]])
        assert text.count("github.com/") == text.count(repo["url"]) == 1, nb_path.name
