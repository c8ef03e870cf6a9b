"""`python -m kdutils.book.edition`: which chapters, their parameters, estimates, resume, budget."""
import json
import math

import nbformat
import pytest

from kdutils.book import chapters, params
from kdutils.book import edition as E


def test_an_edition_takes_the_chapters_its_profile_fits_with_results_last():
    fast = [c.stem for c in E.edition("fast")]
    assert fast == ["08_resnet50_to_resnet18", "09_self_distillation", "10_pretrained_teacher",
                    "07_results"]
    full = [c.stem for c in E.edition("full")]
    assert full[0] == "01_introduction" and full[-1] == "07_results"
    assert {"02_baseline", "06_when_distillation_pays", "appendix_fast"} <= set(full)
    # a chapter is named by its registry name or its notebook's stem
    assert [c.stem for c in E.edition("fast", only=["resnet50_to_resnet18", "07_results"])] == [
        "08_resnet50_to_resnet18", "07_results"]
    assert [c.name for c in E.edition("fast", only=["results", "08_resnet50_to_resnet18"])] == [
        "resnet50_to_resnet18", "results"]
    with pytest.raises(ValueError, match="unknown chapter.*nope"):
        E.edition("fast", only=["nope"])
    with pytest.raises(ValueError, match="unknown profile"):
        E.edition("quick")


@pytest.fixture(autouse=True)
def _own_profiles(monkeypatch):
    monkeypatch.delenv("KD_PROFILE", raising=False)   # the suite forces smoke on chapters


def test_parameters_are_rewritten_in_the_cell_and_checked_first():
    ch = E.edition("fast")[0]
    nb = json.loads(ch.path.read_text())
    E.set_parameters(nb, ch, {"profile": "fast", "seeds": [0, 1, 2, 3, 4]})
    source = E._source(E.parameters_cell(nb))
    assert source.splitlines()[0].startswith('profile = "fast"')
    assert "#" in source.splitlines()[0]                     # the comment stays
    assert E.current_parameters(nb)["seeds"] == [0, 1, 2, 3, 4]
    with pytest.raises(params.ParameterError, match="'profile'"):
        E.set_parameters(nb, ch, {"profile": "quick"})
    with pytest.raises(params.ParameterError, match="'seeds'"):
        E.set_parameters(nb, ch, {"seeds": []})
    with pytest.raises(params.ParameterError, match="no parameter.*'bogus'"):
        E.set_parameters(nb, ch, {"bogus": 1})


def test_plans_follow_the_profile_and_estimates_add_up():
    ch = E.edition("fast")[0]
    fast = chapters.plan(ch.name, E.checked(ch, {"profile": "fast"}))
    assert [(w.arch, w.images, w.epochs, w.runs, w.is_teacher) for w in fast] == [
        ("resnet50", 50_000, 30, 1, True), ("resnet18", 50_000, 30, 3, False),
        ("resnet18", 50_000, 30, 3, False)]
    assert fast[2].teacher == "resnet50" and fast[1].teacher is None
    cpu = chapters.plan(ch.name, E.checked(ch, {"profile": "cpu"}))
    # the cpu profile's teacher learns from every training image, its students from a tenth
    assert [(w.images, w.epochs, w.runs) for w in cpu] == [(50_000, 1, 1), (5_000, 3, 3), (5_000, 3, 3)]
    assert {w.eval_images for w in cpu} == {10_000}
    smoke = chapters.plan(ch.name, E.checked(ch, {"profile": "smoke"}))
    assert {w.images for w in smoke} == {320}
    rates = {"resnet50": 100.0, "resnet18": 400.0}
    seconds = E.estimate(fast, lambda w: rates[w.arch])
    per_epoch = 50_000 + 10_000 / E.EVAL_SPEED_UP   # training images, then the test set
    assert {w.eval_images for w in fast} == {10_000}
    assert seconds == pytest.approx(E.OVERHEAD * (30 * per_epoch / 100 + 6 * 30 * per_epoch / 400))
    results = E.edition("fast")[-1]
    assert chapters.plan(results.name, E.checked(results, {})) == []  # Results


def test_part_one_plans_count_the_teacher_once_not_at_every_step():
    # R5's recipe does not augment: the students look the teacher's outputs up in a table
    ch = next(c for c in E.edition("full") if c.name == "hinton_kd")
    plan = chapters.plan(ch.name, E.checked(ch, {}))
    assert [(w.arch, w.epochs, w.runs, w.teacher, w.is_teacher) for w in plan] == [
        ("deepnn", 10, 1, None, True), ("lightnn", 10, 5, None, False)]


def test_the_speed_appendix_plans_each_network_twice_per_seed():
    ch = next(c for c in E.edition("full") if c.stem == "appendix_fast")
    full = chapters.plan(ch.name, E.checked(ch, {}))
    assert [(w.arch, w.images, w.epochs, w.runs, w.teacher) for w in full] == [
        ("lightnn", 50_000, 10, 10, None), ("deepnn", 50_000, 10, 10, None)]
    one = chapters.plan(ch.name, E.checked(ch, {"students": ["deepnn"], "seeds": [0, 1, 2]}))
    assert [(w.arch, w.runs) for w in one] == [("deepnn", 6)]
    with pytest.raises(params.ParameterError, match="'students'"):
        E.checked(ch, {"students": ["vgg"]})


def test_measure_rate_times_real_steps_with_the_teacher_alongside():
    import torch
    alone = E.measure_rate("lightnn", None, 16, 32, torch.device("cpu"), steps=2)
    taught = E.measure_rate("lightnn", "deepnn", 16, 32, torch.device("cpu"), steps=2)
    assert math.isfinite(alone) and alone > 0 and math.isfinite(taught) and taught > 0


def _notebook(path, chapter, body, params_source):
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell(params_source)
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [cell, nbformat.v4.new_code_cell(
        "from pathlib import Path\nfrom kdutils import book\n"
        f'P = book.chapters.from_notebook(globals(), chapter="{chapter}")\n' + body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


# A tiny book of three registry chapters (an edition knows a page by its registry entry):
# one that trains nothing in every profile, one that fails on request, and Results.
A, B, C = "01_introduction", "appendix_scale_out", "07_results"


@pytest.fixture
def tiny_book(tmp_path, monkeypatch):
    """Three chapters that only write which profile they ran with: one fails on request."""
    (tmp_path / "book").mkdir()
    (tmp_path / "_toc.yml").write_text(f"format: jb-book\nroot: book/{A}\nparts:\n  - chapters:\n"
                                       f"      - file: book/{C}\n      - file: book/{B}\n")
    log = "with Path('ran.txt').open('a') as f:\n    f.write('{}:' + P.get('profile', '-') + '\\n')\n"
    _notebook(tmp_path / "book" / f"{A}.ipynb", "introduction", log.format("a"),
              'profile = "full"   # full | smoke\ndataset = "cifar10"\ndata_dir = None')
    _notebook(tmp_path / "book" / f"{B}.ipynb", "appendix_scale_out",
              "assert not Path('fail-b').exists(), 'told to fail'\n" + log.format("b"),
              'profile = "full"\nepochs = 3')
    _notebook(tmp_path / "book" / f"{C}.ipynb", "results", log.format("c"), "results_dir = None")
    return tmp_path


def _ran(root):
    path = root / "book" / "ran.txt"
    return path.read_text().split() if path.exists() else []


def test_an_edition_runs_in_order_resumes_and_fits_its_budget(tiny_book):
    root, out = tiny_book, tiny_book / "editions" / "smoke"
    quick = lambda ch, values: 1.0  # noqa: E731
    (root / "book" / "fail-b").touch()
    first = E.run_edition("smoke", root=root, seconds=quick, log=lambda *a: None)
    assert first["ran"] == [A] and first["failed"] == [B] and first["not_run"] == [C]
    assert _ran(root) == ["a:smoke"]
    state = json.loads((out / "edition.json").read_text())["chapters"]
    assert state[A]["status"] == "done" and state[B]["status"] == "failed"
    assert "told to fail" in state[B]["error"]
    executed = nbformat.read(out / f"{A}.ipynb", as_version=4)
    assert executed.cells[0].source.startswith('profile = "smoke"   # full | smoke')
    assert not any("injected-parameters" in c.metadata.get("tags", []) for c in executed.cells)

    (root / "book" / "fail-b").unlink()
    second = E.run_edition("smoke", root=root, seconds=quick, log=lambda *a: None)
    assert second["skipped"] == [A] and second["ran"] == [B, C]   # Results last
    assert _ran(root) == ["a:smoke", "b:smoke", "c:-"]
    third = E.run_edition("smoke", root=root, seconds=quick, log=lambda *a: None)
    assert third["ran"] == [] and third["skipped"] == [A, B, C] and len(_ran(root)) == 3

    minutes = {A: 10.0, B: 0.5, C: 0.0}
    budget = E.run_edition("smoke", root=root, out_dir=root / "budget", budget_min=5, publish=True,
                           seconds=lambda ch, v: 60 * minutes[ch.stem], log=lambda *a: None)
    assert budget["left_out"] == [A] and budget["ran"] == [B, C]
    assert budget["estimates"] == {A: 600.0, B: 30.0, C: 0.0}
    published = nbformat.read(root / "book" / f"{B}.ipynb", as_version=4)   # --publish
    assert published.cells[0].source.startswith('profile = "smoke"') and "papermill" in published.metadata


def test_an_edition_refuses_a_profile_forced_otherwise(tiny_book, monkeypatch):
    monkeypatch.setenv("KD_PROFILE", "full")
    with pytest.raises(ValueError, match="KD_PROFILE"):
        E.run_edition("smoke", root=tiny_book, seconds=lambda ch, v: 1.0, log=lambda *a: None)


def test_the_budget_counts_a_shared_teacher_once_in_the_first_chapter_that_runs(tiny_book):
    costs = {A: [("teacher", 300.0), (None, 60.0)], B: [("teacher", 300.0), (None, 60.0)],
             C: [(None, 0.0)]}
    run = lambda budget: E.run_edition(  # noqa: E731
        "smoke", root=tiny_book, budget_min=budget, estimate_only=True,
        seconds=lambda ch, v: costs[ch.stem], log=lambda *a: None)
    tight = run(5.5)    # A (6 min with its teacher) does not fit; B then pays the teacher itself
    assert tight["left_out"] == [A, B] and tight["estimates"] == {A: 360.0, B: 360.0, C: 0.0}
    roomy = run(7.5)    # A pays the teacher; B loads it
    assert roomy["left_out"] == [] and roomy["estimates"] == {A: 360.0, B: 60.0, C: 0.0}


def test_an_edition_refuses_what_it_cannot_do_as_asked(tiny_book):
    quiet = dict(root=tiny_book, seconds=lambda ch, v: 1.0, log=lambda *a: None, estimate_only=True)
    with pytest.raises(ValueError, match=f"{B} have no 'fast' profile"):
        E.run_edition("fast", only=[B], **quiet)
    with pytest.raises(params.ParameterError, match="no chapter.*lr"):
        E.run_edition("smoke", overrides={"lr": 0.1}, **quiet)
    with pytest.raises(params.ParameterError, match="--publish"):
        E.run_edition("smoke", overrides={"epochs": 2}, publish=True, **quiet)


def test_the_cell_keeps_its_layout_for_awkward_values():
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell('profile = "full"  # é\nseeds = [0,\n         1]  # ×\ndataset = "cifar10"\n'
                                     'data_dir = None   # where')
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [cell]
    ch = E.Page(chapters.CHAPTERS["baseline"], E.settings.project_root() / "x.ipynb")
    E.set_parameters(nb, ch, {"seeds": (3, 4), "data_dir": "/d/o'brien # ü", "profile": "smoke"})
    assert E.current_parameters(nb) == {"profile": "smoke", "seeds": [3, 4], "dataset": "cifar10",
                                        "data_dir": "/d/o'brien # ü"}
    assert cell.source.splitlines() == ['profile = "smoke"  # é', "seeds = [3, 4]  # ×",
                                        'dataset = "cifar10"', 'data_dir = "/d/o\'brien # ü"   # where']


def test_the_summary_shows_this_editions_runs_and_the_teacher_they_trained(tmp_path):
    import pandas as pd
    base = {"profile": "cpu", "device": "cpu", "data_source": "x", "train_size": 5000,
            "test_size": 1000, "epochs": 3, "history": [], "params": {}, "torch_version": "2"}
    records = [
        {**base, "chapter": "resnet50_to_resnet18", "method": "ce", "seed": 0, "test_acc": 40.0, "wall_time_s": 60.0,
         "finished_at": "2026-01-01T00:00:00+00:00"},                                  # before
        {**base, "chapter": "resnet50_to_resnet18", "method": "ce", "seed": 0, "test_acc": 44.0, "wall_time_s": 120.0,
         "finished_at": "2026-02-01T00:00:00+00:00"},
        {**base, "chapter": "teacher", "method": "resnet50", "seed": 0, "test_acc": 31.0,
         "wall_time_s": 600.0, "epochs": 4, "finished_at": "2026-02-01T00:00:00+00:00"},  # no arch
        {**base, "chapter": "teacher", "method": "deepnn", "seed": 0, "test_acc": 70.0,
         "wall_time_s": 600.0, "finished_at": "2026-02-01T00:00:00+00:00"},              # not ours
    ]
    for i, r in enumerate(records):
        (tmp_path / f"r{i}.json").write_text(json.dumps(r))
    table = E.summary("cpu", ["08_resnet50_to_resnet18"], "2026-01-15T00:00:00+00:00", results_dir=tmp_path)
    assert list(table["run"]) == ["ce seed 0", "resnet50 seed 0"]
    assert list(table["accuracy (%)"]) == [44.0, 31.0]
    assert list(table["images/s"]) == [125.0, pd.Series([5000 * 4 / 600]).round(0)[0]]


@pytest.mark.parametrize("argv,message", [
    (["--profile", "fast", "--chapters", "02_baseline"], "no 'fast' profile"),
    (["--profile", "fast", "--chapters", "baseline"], "no 'fast' profile"),
    (["--profile", "fast", "--chapters", "hinton"], "unknown chapter(s) hinton"),
    (["--profile", "fast", "--set", "seeds"], "NAME=VALUE"),
    (["--profile", "fast", "--budget", "0"], "--budget must be > 0"),
    (["--profile", "fast", "--set", "nope=1", "--estimate"], "no chapter of this edition has parameter"),
])
def test_the_command_line_names_what_is_wrong(argv, message, capsys):
    with pytest.raises(SystemExit):
        E.main(argv)
    assert message in capsys.readouterr().err
