"""Chapter parameters: bad values stop the run with a message naming the parameter."""
import json
from pathlib import Path

import pytest

from kdutils import params
from kdutils.params import ParameterError

BOOK = Path(__file__).resolve().parents[1] / "book"


@pytest.fixture(autouse=True)
def _no_forced_profile(monkeypatch):
    monkeypatch.delenv("KD_PROFILE", raising=False)


@pytest.mark.parametrize("chapter,values,message", [
    ("hinton", {"alpah": 0.5}, r"unknown parameter\(s\) 'alpah'"),
    ("hinton", {"epochs": "10"}, r"'epochs' = '10' .* an integer >= 1"),
    ("hinton", {"epochs": 2.5}, r"'epochs' = 2.5 .* an integer >= 1"),
    ("hinton", {"epochs": 0}, r"'epochs' = 0 .* an integer >= 1"),
    ("hinton", {"batch_size": 0}, r"'batch_size' = 0 .* an integer >= 1"),
    ("hinton", {"T": 0}, r"'T' = 0 .* a number > 0"),
    ("hinton", {"T": -1.0}, r"'T' = -1.0 .* a number > 0"),
    ("hinton", {"alpha": 1.5}, r"'alpha' = 1.5 .* a number in \[0, 1\]"),
    ("hinton", {"alpha": -0.1}, r"'alpha' = -0.1 .* a number in \[0, 1\]"),
    ("hinton", {"lr": 0.0}, r"'lr' = 0.0 .* a number > 0"),
    ("hinton", {"profile": "fastest"}, r"'profile' = 'fastest' .* one of 'full', 'smoke'"),
    ("hinton", {"dataset": "mnist"}, r"'dataset' = 'mnist' .* one of 'cifar10'"),
    ("hinton", {"teacher": "resnet50"}, r"'teacher' = 'resnet50' .* one of 'deepnn', 'lightnn'"),
    ("hinton", {"seeds": []}, r"'seeds' = \[\] .* non-empty list"),
    ("hinton", {"seeds": [0, 0]}, r"without repeats"),
    ("hinton", {"device": "gpu"}, r"'device' = 'gpu' .* 'auto', 'cpu'"),
    ("hinton", {"progress": "yes"}, r"'progress' = 'yes' .* True or False"),
    ("cosine", {"hidden_weight": -0.3}, r"'hidden_weight' = -0.3 .* a number >= 0"),
    ("cosine", {"hidden_weight": 0.0, "ce_weight": 0.0}, r"both 0"),
    ("regressor", {"hint_weight": float("nan")}, r"'hint_weight' = nan .* a number >= 0"),
    ("baseline", {"T": 2.0}, r"unknown parameter\(s\) 'T' for chapter 'baseline'"),
])
def test_bad_parameters_are_refused_with_the_name_and_what_is_allowed(chapter, values, message):
    with pytest.raises(ParameterError, match=message):
        params.check(chapter, **values)


def test_profile_from_environment_is_checked_too(monkeypatch):
    monkeypatch.setenv("KD_PROFILE", "tiny")
    with pytest.raises(ParameterError, match=r"'profile' = 'tiny' \(from \$KD_PROFILE\)"):
        params.check("baseline")


def test_smoke_profile_shrinks_the_run_and_full_keeps_it(monkeypatch):
    full = params.check("hinton")
    assert (full.epochs, full.seeds, full.train_size, full.T) == (10, [0, 1, 2, 3, 4], None, 5.0)
    monkeypatch.setenv("KD_PROFILE", "smoke")
    smoke = params.check("hinton", T=2.0)
    assert (smoke.profile, smoke.epochs, smoke.teacher_epochs, smoke.seeds, smoke.train_size) == \
        ("smoke", 1, 1, [0, 1], 2000)
    assert smoke.T == 2.0 and smoke.alpha == 0.5


def test_from_notebook_catches_a_misspelt_papermill_name():
    ns = {"In": [], "_i1": "", "kd": params, "profile": "full", "epochs": 3, "alhpa": 0.2}
    with pytest.raises(ParameterError, match="'alhpa'"):
        params.from_notebook(ns, "hinton")
    del ns["alhpa"]
    assert params.from_notebook(ns, "hinton").epochs == 3


def _parameters_cell(nb_path):
    nb = json.loads(nb_path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert "parameters" in code[0]["metadata"].get("tags", []), f"{nb_path.name}: first code cell untagged"
    ns = {}
    exec("".join(code[0]["source"]), ns)
    return {k: v for k, v in ns.items() if not k.startswith("__")}


CHAPTERS = {"01_introduction": "introduction", "02_baseline": "baseline", "03_hinton_kd": "hinton",
            "04_cosine_hidden_state": "cosine", "05_intermediate_regressor": "regressor",
            "06_when_distillation_pays": "pays",
            "07_results": "results", "08_resnet50_to_resnet18": "resnet",
            "09_self_distillation": "selfdistill", "10_pretrained_teacher": "pretrained"}


@pytest.mark.parametrize("stem,chapter", CHAPTERS.items())
def test_notebook_parameter_cells_hold_the_full_run_defaults(stem, chapter):
    """The visible parameters cell holds the chapter's defaults; only ``profile`` may name
    the profile the committed outputs were produced with (one cell, the run's own)."""
    cell = _parameters_cell(BOOK / f"{stem}.ipynb")
    defaults = params.DEFAULTS[chapter]
    if "profile" in defaults:
        assert cell["profile"] in params.SCHEMAS[chapter]["profile"].options
        cell = {**cell, "profile": defaults["profile"]}
    assert cell == defaults


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
