"""The pages against the records: every number a page glues with its runs is recomputed from
results/, and no page shows a machine's own path."""
import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest

from kdutils.book import audit

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "book").glob("*.ipynb"))
# pages executed since their numbers carry their runs (the others still quote numbers without)
SOURCED = {"02_baseline", "03_hinton_kd", "04_cosine_hidden_state", "05_intermediate_regressor",
           "07_results", "10_pretrained_teacher"}


def _output(name, value):
    """A glued value as myst-nb stores it in a page."""
    return {"data": {"application/papermill.record/text/plain": repr(value)},
            "metadata": {"scrapbook": {"mime_prefix": "application/papermill.record/", "name": name}},
            "output_type": "display_data"}


def _record(folder, key, method, seed, acc, epochs=10):
    rec = {"chapter": "hinton_kd", "method": method, "profile": "full", "device": "cpu",
           "data_source": "cifar10-png", "train_size": 50000, "test_size": 10000, "seed": seed,
           "epochs": epochs, "test_acc": acc, "history": [], "wall_time_s": 90.0,
           "params": {"epochs": epochs, "seed": seed}, "model": "LightNN", "teacher_key": None,
           "run_key": key, "torch_version": "2.14.1"}
    (folder / f"{method}-seed{seed}-{key}.json").write_text(json.dumps(rec))
    return rec


@pytest.fixture
def page_and_records(tmp_path):
    """A page gluing KD's mean and its paired gain over CE (3 seeds each), and those records."""
    results = tmp_path / "results"
    (results / "hinton_kd").mkdir(parents=True)
    kd_ = pd.DataFrame([_record(results / "hinton_kd", f"k{s}", "kd", s, 70.0 + s) for s in range(3)])
    ce = pd.DataFrame([_record(results / "hinton_kd", f"c{s}", "ce", s, 69.0 + s / 2) for s in range(3)])
    outputs = []
    for name, stat, base in (("kd_mean", "mean", None), ("kd_diff", "diff", ce), ("kd_lo", "ci_low", ce)):
        outputs += [_output(name, audit.stat(stat, kd_, base)),
                    _output(name + audit.SUFFIX, json.dumps({"stat": stat, **audit.sources(kd_, base)}))]
    page = tmp_path / "page.ipynb"
    page.write_text(json.dumps({"cells": [{"cell_type": "code", "source": "", "outputs": outputs}]}))
    return page, results


def test_statistics_of_runs_paired_by_seed():
    arm = pd.DataFrame({"seed": [0, 1, 2], "test_acc": [70.0, 72.0, 71.0], "wall_time_s": [60, 60, 120]})
    base = pd.DataFrame({"seed": [2, 0, 1], "test_acc": [70.0, 69.0, 70.0], "wall_time_s": [1, 1, 1]})
    assert audit.stat("mean", arm) == 71.0 and audit.stat("std", arm) == 1.0
    assert (audit.stat("min", arm), audit.stat("max", arm), audit.stat("seeds", arm)) == (70.0, 72.0, 3)
    assert audit.stat("minutes", arm) == 4.0
    # per seed: 1, 2, 1 -> mean 4/3, std 1/sqrt(3), t(0.975, 2) = 4.3027
    assert audit.stat("diff", arm, base) == pytest.approx(4 / 3)
    half = 4.302652729911275 * (1 / math.sqrt(3)) / math.sqrt(3)
    assert audit.stat("ci_low", arm, base) == pytest.approx(4 / 3 - half)
    assert audit.stat("ci_high", arm, base) == pytest.approx(4 / 3 + half)
    with pytest.raises(ValueError, match="needs a baseline"):
        audit.stat("diff", arm)
    with pytest.raises(ValueError, match="unknown statistic 'median'"):
        audit.stat("median", arm)


def test_a_page_that_agrees_with_its_records_passes(page_and_records):
    page, results = page_and_records
    assert audit.glued(page)["kd_mean"] == 71.0
    assert audit.audit_page(page, results) == []


def test_a_corrupted_record_makes_the_page_disagree(page_and_records, tmp_path):
    page, results = page_and_records
    copy = tmp_path / "copy"
    shutil.copytree(results, copy)
    path = next(copy.rglob("kd-seed1-*.json"))
    rec = json.loads(path.read_text())
    rec["test_acc"] = 75.0
    path.write_text(json.dumps(rec))
    problems = audit.audit_page(page, copy)
    assert len(problems) == 3 and all("its records give" in p for p in problems)
    assert problems[0] == "kd_mean: the page shows 71.0, its records give 72.33333333333333"
    assert audit.audit_page(page, results) == []   # the original is untouched


def test_a_missing_record_and_an_unshown_seed_are_reported(page_and_records):
    page, results = page_and_records
    next(results.rglob("ce-seed2-*.json")).unlink()
    assert any(p.startswith("kd_diff: no record of run(s) c2") for p in audit.audit_page(page, results))
    _record(results / "hinton_kd", "c2", "ce", 2, 70.0)
    _record(results / "hinton_kd", "k3", "kd", 3, 73.0)      # a fourth seed the page never saw
    problems = audit.audit_page(page, results)
    assert problems and all("seed(s) [3] of the same experiment" in p for p in problems)
    _record(results / "hinton_kd", "k9", "kd", 9, 60.0, epochs=20)   # another experiment: fine
    (results / "hinton_kd" / "kd-seed3-k3.json").unlink()
    assert audit.audit_page(page, results) == []


@pytest.mark.parametrize("page", PAGES, ids=[p.stem for p in PAGES])
def test_every_page_agrees_with_the_records(page):
    values = audit.glued(page)
    sourced = [n for n in values if n.endswith(audit.SUFFIX)]
    if page.stem in SOURCED:
        assert sourced, f"{page.name} glues no number with the runs it came from"
    assert audit.audit_page(page, ROOT / "results") == []


def test_machine_paths_are_found_in_outputs(tmp_path):
    page = tmp_path / "p.ipynb"
    outputs = [{"output_type": "stream", "name": "stdout", "text": ["saved to results/x.json\n",
                                                                    "cache in ~/.cache/torch\n"]},
               {"output_type": "stream", "name": "stderr", "text": "Downloading to /root/.cache/torch/x.pth\n"},
               {"output_type": "execute_result", "data": {"text/plain": "'C:\\\\Users\\\\ann\\\\kd'"}},
               _output("where", "/home/ann/kd/results")]
    page.write_text(json.dumps({"cells": [{"cell_type": "code", "source": "", "outputs": outputs}]}))
    found = audit.machine_paths(page)
    assert len(found) == 3
    assert "/root/.cache" in found[0] and "Users" in found[1] and "/home/ann" in found[2]


def test_paths_and_commands_are_shown_relative_to_the_project_or_home(tmp_path, monkeypatch):
    from kdutils import settings
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert settings.shown_path(ROOT / "results" / "teacher") == "results/teacher"
    assert settings.shown_path(tmp_path / "home" / ".cache" / "torch") == "~/.cache/torch"
    assert settings.shown_path(tmp_path / "elsewhere" / "cifar10-png") == "cifar10-png"
    shown = settings.shown_command(f"python -m kdutils.tools.bench --data-dir {ROOT}/.data/cifar10-png "
                                   f"--out {tmp_path}/b.json --steps 5")
    assert shown == "python -m kdutils.tools.bench --data-dir .data/cifar10-png --out b.json --steps 5"
    assert not audit.MACHINE_PATH.search(shown)


@pytest.mark.parametrize("page", PAGES, ids=[p.stem for p in PAGES])
def test_no_page_shows_a_machine_path(page):
    assert audit.machine_paths(page) == []
