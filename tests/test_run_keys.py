"""The committed records keep their run keys under the code that would run them again: a
reader who reruns a chapter (same parameters, same data) reloads them instead of training."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from torch import nn

import kdutils as kd

RESULTS = Path(__file__).resolve().parents[1] / "results"


def _committed(chapter: str, method: str | None = None, profile: str | None = None,
               epochs: float | None = None) -> set[str]:
    records = [json.loads(p.read_text()) for p in sorted((RESULTS / chapter).glob("*.json"))]
    return {r["run_key"] for r in records
            if (method is None or r["method"] == method) and (profile is None or r["profile"] == profile)
            and (epochs is None or r["epochs"] == epochs)}


def _teacher_key(method: str, profile: str) -> str:
    # the chapters' airbench teacher is the 9.9-epoch recipe; longer schedules are the appendix's
    epochs = kd.airbench.AirbenchRecipe().epochs if method == "airbench" else None
    (key,) = _committed("teacher", method, profile, epochs)
    return key


@pytest.fixture
def planned(monkeypatch, tmp_path):
    """Run the recipes with training replaced by the key it would use; returns those keys."""
    monkeypatch.delenv("KD_PROFILE", raising=False)

    class Keys(list):
        chapter = {}   # key -> the chapter the run is filed under

    keys = Keys()

    def fake_load(P, train_size="students"):
        n = P.train_size if train_size == "students" else train_size
        return SimpleNamespace(source="cifar10-jpeg", train_y=range(n or 50_000),
                               test_y=range(P.test_size or 10_000))

    def fake_fit(model, data, recipe, *, chapter, method, params, profile, teacher_key=None, **kw):
        key = kd.runs.run_paths(model, data, recipe, chapter=chapter, method=method, params=params,
                                profile=profile, teacher_key=teacher_key, ckpt_dir=str(tmp_path))[0]
        keys.append(key)
        keys.chapter[key] = chapter

    def teacher(method, profile):
        return SimpleNamespace(model=nn.Identity(), record={"run_key": _teacher_key(method, profile)})

    monkeypatch.setattr(kd.recipes, "load_data", fake_load)
    monkeypatch.setattr(kd.methods, "fit", fake_fit)
    monkeypatch.setattr(kd.teachers, "get_teacher", lambda name, *a, **k: teacher(name, k["profile"]))
    monkeypatch.setattr(kd.teachers, "pretrained_teacher", lambda P, data: kd.teachers.PretrainedTeacher(
        teacher("airbench", "full"), "airbench", "groups", 256))
    return keys


@pytest.mark.parametrize("recipe,chapter", [("baseline", "baseline"), ("hinton_kd", "hinton"),
                                            ("cosine", "cosine"), ("regressor", "regressor")])
def test_part_one_records_keep_their_keys(planned, recipe, chapter):
    kd.recipes.part_one(recipe, kd.params.check(chapter))
    committed = _committed(chapter)
    assert len(committed) == 5 and committed <= set(planned)


def test_chapter_10_records_keep_their_keys(planned):
    P = kd.params.check("pretrained", profile="cpu", teacher_weights="none")
    kd.recipes.pretrained(P)
    committed = _committed("pretrained", profile="cpu")
    assert len(committed) == 9 and committed == set(planned)


def test_chapter_8_fast_records_keep_their_keys(planned):
    kd.recipes.resnet_kd(kd.params.check("resnet", profile="fast"))  # the run made on a GPU
    committed = _committed("resnet", profile="fast")
    assert len(committed) == 6 and committed == set(planned)


def test_chapter_9_shares_chapter_8s_plain_resnet18_only_when_it_is_the_same_run(planned):
    ch8, ch9 = kd.params.check("resnet", profile="cpu"), kd.params.check("selfdistill", profile="cpu")
    data = kd.recipes.load_data(ch8)
    kd.recipes.resnet_students(ch8, data, SimpleNamespace(model=nn.Identity(), record={"run_key": "t"}))
    chapter_8_ce = planned[:3]
    del planned[:]
    kd.recipes.plain_resnet18(ch9, data)
    assert planned == chapter_8_ce   # the same three runs, trained once
    del planned[:]
    ch9_smoke = kd.params.check("selfdistill", profile="smoke")  # AutoAugment and erasing: R1's recipe
    kd.recipes.plain_resnet18(ch9_smoke, kd.recipes.load_data(ch9_smoke))
    assert len(planned) == 1 and planned[0] not in chapter_8_ce
    assert planned.chapter[planned[0]] == "selfdistill" and planned.chapter[chapter_8_ce[0]] == "resnet"
