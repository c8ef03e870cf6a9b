"""Chapter parameters: bad values stop the run with a message naming the parameter; the
notebooks' parameter cells agree with the chapter registry."""
import json
import re
from pathlib import Path

import pytest

from kdutils.book import chapters
from kdutils.book.chapters import CHAPTERS
from kdutils.book.edition import current_parameters, parameters_cell
from kdutils.book.params import ParameterError

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"


@pytest.fixture(autouse=True)
def _no_forced_profile(monkeypatch):
    monkeypatch.delenv("KD_PROFILE", raising=False)


@pytest.mark.parametrize("chapter,values,message", [
    ("hinton_kd", {"alpah": 0.5}, r"unknown parameter\(s\) 'alpah'"),
    ("hinton_kd", {"epochs": "10"}, r"'epochs' = '10' .* an integer >= 1"),
    ("hinton_kd", {"epochs": 2.5}, r"'epochs' = 2.5 .* an integer >= 1"),
    ("hinton_kd", {"epochs": 0}, r"'epochs' = 0 .* an integer >= 1"),
    ("hinton_kd", {"batch_size": 0}, r"'batch_size' = 0 .* an integer >= 1"),
    ("hinton_kd", {"T": 0}, r"'T' = 0 .* a number > 0"),
    ("hinton_kd", {"T": -1.0}, r"'T' = -1.0 .* a number > 0"),
    ("hinton_kd", {"alpha": 1.5}, r"'alpha' = 1.5 .* a number in \[0, 1\]"),
    ("hinton_kd", {"alpha": -0.1}, r"'alpha' = -0.1 .* a number in \[0, 1\]"),
    ("hinton_kd", {"lr": 0.0}, r"'lr' = 0.0 .* a number > 0"),
    ("hinton_kd", {"profile": "fastest"}, r"'profile' = 'fastest' .* one of 'full', 'smoke'"),
    ("hinton_kd", {"dataset": "mnist"}, r"'dataset' = 'mnist' .* one of 'cifar10'"),
    ("hinton_kd", {"teacher": "resnet50"}, r"'teacher' = 'resnet50' .* one of 'deepnn', 'lightnn'"),
    ("hinton_kd", {"seeds": []}, r"'seeds' = \[\] .* non-empty list"),
    ("hinton_kd", {"seeds": [0, 0]}, r"without repeats"),
    ("hinton_kd", {"device": "gpu"}, r"'device' = 'gpu' .* 'auto', 'cpu'"),
    ("hinton_kd", {"progress": "yes"}, r"'progress' = 'yes' .* True or False"),
    ("cosine_hidden_state", {"hidden_weight": -0.3}, r"'hidden_weight' = -0.3 .* a number >= 0"),
    ("cosine_hidden_state", {"hidden_weight": 0.0, "ce_weight": 0.0}, r"both 0"),
    ("intermediate_regressor", {"hint_weight": float("nan")}, r"'hint_weight' = nan .* a number >= 0"),
    ("baseline", {"T": 2.0}, r"unknown parameter\(s\) 'T' for chapter 'baseline'"),
])
def test_bad_parameters_are_refused_with_the_name_and_what_is_allowed(chapter, values, message):
    with pytest.raises(ParameterError, match=message):
        chapters.check(chapter, **values)


def test_profile_from_environment_is_checked_too(monkeypatch):
    monkeypatch.setenv("KD_PROFILE", "tiny")
    with pytest.raises(ParameterError, match=r"'profile' = 'tiny' \(from \$KD_PROFILE\)"):
        chapters.check("baseline")


def test_smoke_profile_shrinks_the_run_and_full_keeps_it(monkeypatch):
    full = chapters.check("hinton_kd")
    assert (full.epochs, full.seeds, full.train_size, full.T) == (10, [0, 1, 2, 3, 4], None, 5.0)
    monkeypatch.setenv("KD_PROFILE", "smoke")
    smoke = chapters.check("hinton_kd", T=2.0)
    assert (smoke.profile, smoke.epochs, smoke.teacher_epochs, smoke.seeds, smoke.train_size) == \
        ("smoke", 1, 1, [0, 1], 2000)
    assert smoke.T == 2.0 and smoke.alpha == 0.5


def test_from_notebook_catches_a_misspelt_papermill_name():
    ns = {"In": [], "_i1": "", "chapters": chapters, "profile": "full", "epochs": 3, "alhpa": 0.2}
    with pytest.raises(ParameterError, match="'alhpa'"):
        chapters.from_notebook(ns, "hinton_kd")
    del ns["alhpa"]
    assert chapters.from_notebook(ns, "hinton_kd").epochs == 3


def test_an_unknown_chapter_is_refused_with_the_known_ones():
    with pytest.raises(ParameterError, match=r"unknown chapter 'hinton'; known: introduction, baseline, hinton_kd"):
        chapters.check("hinton")


def _notebook(name):
    return json.loads(CHAPTERS[name].path(ROOT).read_text())


# A chapter's setup call: book.chapters.from_notebook(globals(), chapter="NAME") or
# book.notebook.setup(globals(), chapter="NAME", ...).
SETUP = re.compile(r"(?:chapters\.from_notebook|notebook\.setup)\(\s*globals\(\)\s*,\s*"
                   r"chapter\s*=\s*[\"']([^\"']+)[\"']")


def _toc_stems():
    toc = (ROOT / "_toc.yml").read_text()
    return [Path(f).name for f in re.findall(r"^\s*-?\s*(?:root|file):\s*(\S+)", toc, flags=re.M)]


@pytest.mark.parametrize("name", CHAPTERS)
def test_one_name_everywhere(name):
    """The entry's name is its notebook's stem without the "NN_" prefix."""
    entry = CHAPTERS[name]
    assert entry.name == name
    assert re.sub(r"^\d\d_", "", entry.notebook) == name


@pytest.mark.parametrize("name", CHAPTERS)
def test_each_chapter_notebook_sets_itself_up_under_its_registry_name(name):
    path = CHAPTERS[name].path(ROOT)
    assert path.is_file(), f"chapter {name!r}: no notebook {path.relative_to(ROOT)}"
    code = "\n".join("".join(c["source"]) for c in _notebook(name)["cells"] if c["cell_type"] == "code")
    assert SETUP.findall(code) == [name], f"{path.name}: its setup call must name chapter={name!r}"


@pytest.mark.parametrize("name", CHAPTERS)
def test_notebook_parameter_cells_hold_the_full_run_defaults(name):
    """The visible parameters cell (the first code cell) assigns exactly the chapter's
    parameters, with the registry's defaults; only ``profile`` may name the profile the
    committed outputs were produced with (one cell, the run's own)."""
    entry, nb = CHAPTERS[name], _notebook(name)
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert "parameters" in code[0]["metadata"].get("tags", []), f"{entry.notebook}: first code cell untagged"
    assert parameters_cell(nb) is code[0]
    cell = current_parameters(nb)
    assert set(cell) == set(entry.schema), \
        f"{entry.notebook}: parameters {sorted(set(cell) ^ set(entry.schema))} differ from the registry's"
    assert set(entry.defaults) == set(entry.schema)
    if "profile" in entry.defaults:
        assert cell["profile"] in entry.schema["profile"].options
        cell = {**cell, "profile": entry.defaults["profile"]}
    assert cell == entry.defaults


def test_every_notebook_of_the_book_is_a_registry_chapter():
    by_notebook = {c.notebook: c.name for c in CHAPTERS.values()}
    stems = _toc_stems()
    notebooks = [s for s in stems if (BOOK / f"{s}.ipynb").is_file()]
    # the pages that are not notebooks: the landing page, the API reference, the bibliography
    assert sorted(set(stems) - set(notebooks)) == ["api", "bibliography", "index"]
    assert [s for s in notebooks if s not in by_notebook] == []
    assert sorted(notebooks) == sorted(by_notebook)          # every chapter is in the book
    assert sorted(p.stem for p in BOOK.glob("*.ipynb")) == sorted(by_notebook)


@pytest.mark.parametrize("path", sorted(BOOK.glob("*.ipynb")), ids=lambda p: p.stem)
def test_committed_pages_show_one_parameters_cell_and_no_progress_or_error_residue(path):
    nb = json.loads(path.read_text())
    cells = nb["cells"]
    assert not any("injected-parameters" in c["metadata"].get("tags", []) for c in cells), \
        f"{path.name}: a papermill injected-parameters cell; put the run's values in the parameters cell"
    for i, c in enumerate(cells):
        for out in c.get("outputs", []):
            assert out["output_type"] != "error", f"{path.name}, cell {i}: an error output"
            if out.get("name") == "stderr":
                text = "".join(out["text"])
                assert text.count("\n") + text.count("\r") <= 5, \
                    f"{path.name}, cell {i}: {len(text)} characters of stderr (progress bars?)"
