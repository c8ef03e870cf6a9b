"""Run keys and the committed records.

A run's key names everything that defines it (chapter, method, recipe, loss weights, data,
teacher, the student's class and initial weights); the chapters' recipes compute the same
keys every time they run, so that a reader who reruns a chapter reloads its finished runs
instead of training them again. The committed records under ``results/`` are all readable
and filed under the registry's chapter names. (Their keys are not pinned to the code: the
redesign that put the teacher's and the student's initial weights into a run's identity
changed every key on purpose, and each chapter is retrained on new data.)
"""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from torch import nn

import kdutils as kd
from kdutils import book
import kdutils.book.cli  # noqa: F401  (a command: not imported by kdutils.book itself)
from kdutils.book.chapters import CHAPTERS
from kdutils.runs import Run
from kdutils.settings import RunOptions
from kdutils.train import Recipe

RESULTS = Path(__file__).resolve().parents[1] / "results"


# ---- the committed records ------------------------------------------------------------------

def _run_records() -> dict[Path, dict]:
    """Every JSON run record under results/ (the benchmark's tables have no run key)."""
    records = {p: json.loads(p.read_text()) for p in sorted(RESULTS.rglob("*.json"))}
    return {p: r for p, r in records.items() if isinstance(r, dict) and "run_key" in r}


def test_committed_records_load_under_the_registry_chapter_names():
    on_disk = _run_records()
    assert len(on_disk) >= 13, "the committed run records are missing"
    for path, r in on_disk.items():
        missing = [k for k in kd.results.REQUIRED if k not in r]
        assert not missing, f"{path.relative_to(RESULTS)} lacks {missing}"
        assert path.parent.name == r["chapter"], f"{path.relative_to(RESULTS)} is filed under another chapter"
    frame = kd.results.load_records(RESULTS)
    assert len(frame) == len(on_disk)   # none skipped
    assert set(kd.results.REQUIRED) <= set(frame.columns)
    assert not frame[list(kd.results.REQUIRED)].isna().any().any()
    unknown = set(frame["chapter"]) - set(CHAPTERS) - {"teacher"}
    assert not unknown, f"records of chapters the registry does not know: {sorted(unknown)}"
    assert sorted(set(frame["path"])) == sorted(str(p) for p in on_disk)


def test_recipe_key_adds_later_fields_only_when_set():
    assert "autoaugment" not in Recipe(epochs=1).key() and "erasing" not in Recipe(epochs=1).key()
    assert Recipe(epochs=1, autoaugment=True, erasing=0.5).key()["erasing"] == 0.5
    with pytest.raises(ValueError, match="erasing must be a probability"):
        Recipe(epochs=1, erasing=1.5)
    with pytest.raises(ValueError, match="schedule must be one of"):
        Recipe(epochs=1, schedule="step")


# ---- the recipes' keys ----------------------------------------------------------------------

class Planned(list):
    """The runs a recipe would train, in order: ``(chapter, method, seed, key)`` each."""

    @property
    def keys(self) -> list[str]:
        return [key for *_, key in self]

    def clear(self):
        del self[:]


@pytest.fixture
def planned(monkeypatch, tmp_path):
    """Run the recipes with training replaced by the key it would use; returns those runs."""
    monkeypatch.delenv("KD_PROFILE", raising=False)
    runs = Planned()

    def fake_load(P, train_size="students"):
        n = P.train_size if train_size == "students" else train_size
        return SimpleNamespace(source="cifar10-jpeg", train_y=range(n or 50_000),
                               test_y=range(P.test_size or 10_000))

    def fake_fit(model, data, recipe, *, chapter, method, params=None, teacher=None,
                 options=RunOptions(), **kw):
        key = kd.runs.run_paths(model, data, recipe, chapter=chapter, method=method,
                                params=dict(params or {}), teacher=teacher,
                                options=RunOptions(profile=options.profile, ckpt_dir=tmp_path))[0]
        runs.append((chapter, method, recipe.seed, key))

    def teacher(name, profile):   # a finished teacher run, named by its key
        return Run(nn.Identity(), {"run_key": f"{name}-{profile}"}, tmp_path / f"{name}.pt")

    monkeypatch.setattr(book.recipes, "load_data", fake_load)
    monkeypatch.setattr(kd.methods, "fit", fake_fit)
    monkeypatch.setattr(book.teachers, "get_teacher",
                        lambda name, *a, options=RunOptions(), **k: teacher(name, options.profile))
    monkeypatch.setattr(book.teachers, "pretrained_teacher", lambda P, data: book.teachers.PretrainedTeacher(
        teacher("airbench", "full"), "airbench", "groups.2", 256))
    return runs


# Part I's chapters with their own parameters, Part II's in the cpu profile (three seeds).
RUNNERS = [(name, {} if "cpu" not in CHAPTERS[name].schema["profile"].options else {"profile": "cpu"})
           for name in book.cli.RECIPES]


def test_every_chapter_with_a_runner_is_planned():
    assert [name for name, _ in RUNNERS] == [name for name, ch in CHAPTERS.items() if ch.run is not None]
    assert {"baseline", "hinton_kd", "resnet50_to_resnet18", "pretrained_teacher"} <= set(book.cli.RECIPES)


@pytest.mark.parametrize("name,values", RUNNERS, ids=[name for name, _ in RUNNERS])
def test_a_chapters_recipe_names_its_runs_the_same_way_every_time(planned, name, values):
    P = book.chapters.check(name, **values)
    CHAPTERS[name].run(P)
    first = list(planned)
    planned.clear()
    CHAPTERS[name].run(book.chapters.check(name, **values))
    assert planned == first and len(first) > 0   # the same runs, the same keys, in the same order
    # one key per (method, seed): a run is never trained twice, nor two runs under one name
    runs = {(method, seed) for _, method, seed, _ in first}
    assert len(runs) == len(first) == len(set(planned.keys))
    assert {seed for *_, seed, _ in first} == set(P.seeds)
    assert {chapter for chapter, *_ in first} <= {name, "resnet50_to_resnet18"}   # ch. 9 may share ch. 8's


def test_a_run_key_changes_with_the_teacher_and_the_students_initial_weights(planned):
    P = book.chapters.check("hinton_kd", seeds=[0])
    data = book.recipes.load_data(P)
    recipe = Recipe(epochs=P.epochs)
    common = dict(seeds=[0], recipe=recipe, chapter="hinton_kd", weights={"T": P.T, "alpha": P.alpha})
    kd.methods.train_seeds("kd", data, teacher=Run(nn.Identity(), {"run_key": "a"}, Path("a.pt")), **common)
    kd.methods.train_seeds("kd", data, teacher=Run(nn.Identity(), {"run_key": "b"}, Path("b.pt")), **common)
    kd.methods.train_seeds("kd", data, student=lambda seed: kd.models.build("lightnn", seed=seed + 1),
                           teacher=Run(nn.Identity(), {"run_key": "a"}, Path("a.pt")), **common)
    kd.methods.train_seeds("kd", data, teacher=Run(nn.Identity(), {"run_key": "a"}, Path("a.pt")), **common)
    a, b, other_init, again = planned.keys
    assert len({a, b, other_init}) == 3 and again == a


def test_chapter_9_shares_chapter_8s_plain_resnet18_only_when_it_is_the_same_run(planned):
    ch8 = book.chapters.check("resnet50_to_resnet18", profile="cpu")
    ch9 = book.chapters.check("self_distillation", profile="cpu")
    data = book.recipes.load_data(ch8)
    book.recipes.resnet_students(ch8, data, Run(nn.Identity(), {"run_key": "t"}, Path("t.pt")))
    chapter_8_ce = planned[:3]
    planned.clear()
    book.recipes.plain_resnet18(ch9, data, ch8)
    assert planned == chapter_8_ce   # the same three runs, trained once
    planned.clear()
    # the smoke profile keeps AutoAugment and erasing (R1's recipe), which chapter 8 has not
    ch9_smoke = book.chapters.check("self_distillation", profile="smoke")
    ch8_smoke = book.chapters.check("resnet50_to_resnet18", profile="smoke")
    book.recipes.plain_resnet18(ch9_smoke, book.recipes.load_data(ch9_smoke), ch8_smoke)
    assert len(planned) == 1 and planned.keys[0] not in [key for *_, key in chapter_8_ce]
    assert planned[0][0] == "self_distillation" and chapter_8_ce[0][0] == "resnet50_to_resnet18"
