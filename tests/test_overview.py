"""The Results chapter's tables: what a page shows now, and the book beside published numbers."""
import pandas as pd

from kdutils.book import overview
from kdutils.results import _with_identity


def _runs(rows):
    base = {"profile": "full", "device": "cpu (2 threads, Intel(R) Xeon(R) Processor, AVX512)",
            "train_size": 50000, "test_size": 10000, "teacher_key": None, "model": "LightNN",
            "epochs": 10, "wall_time_s": 120.0, "model_params": 267738, "mflops_per_image": 2.6,
            "history": [], "run_key": None}
    out = []
    for i, r in enumerate(rows):
        rec = {**base, **r}
        rec["params"] = {"epochs": rec["epochs"], "seed": rec["seed"], **rec.pop("extra", {})}
        rec["run_key"] = rec["run_key"] or f"k{i}"
        out.append(rec)
    return _with_identity(pd.DataFrame(out))


def test_a_chapter_re_run_on_the_original_pixels_shows_only_those_runs():
    runs = _runs([{"chapter": "baseline", "method": "ce", "seed": s, "data_source": d, "test_acc": a}
                  for s in range(3) for d, a in (("cifar10-jpeg", 69.0), ("cifar10-png", 70.0))]
                 + [{"chapter": "hinton_kd", "method": "kd", "seed": 0, "data_source": "cifar10-jpeg",
                     "test_acc": 68.0}])
    shown, superseded = overview.current(runs)
    assert sorted(set(zip(shown.chapter, shown.data_source))) == [("baseline", "cifar10-png"),
                                                                  ("hinton_kd", "cifar10-jpeg")]
    assert len(shown) == 4 and len(superseded) == 3 and set(superseded.data_source) == {"cifar10-jpeg"}


def test_a_parts_table_has_one_short_row_per_experiment_with_its_teacher_named():
    teacher = {"chapter": "teacher", "method": "airbench", "seed": 1, "data_source": "cifar10-png",
               "test_acc": 94.1, "run_key": "t1", "extra": {"label_smoothing": 0.0}}
    runs = _runs([teacher]
                 + [{"chapter": "when_distillation_pays", "method": "kd", "seed": s,
                     "data_source": "cifar10-png", "test_acc": 70.0 + s, "teacher_key": "t1",
                     "extra": {"fraction": 1.0}} for s in range(2)]
                 + [{"chapter": "when_distillation_pays", "method": "kd", "seed": s, "epochs": 3,
                     "data_source": "cifar10-png", "test_acc": 50.0, "extra": {"fraction": 0.01}}
                    for s in range(2)])
    table = overview.part_table(runs, overview.PART_ONE)
    assert list(table["chapter"]) == ["teachers", "6 strong teacher"]   # the few-label runs stay out
    row = table.iloc[1]
    assert (row["method"], row["accuracy (%)"], row["seeds"], row["device"], row["data"]) == \
        ("KD", "70.50 ± 0.71", 2, "CPU, AVX512", "png")
    exp = overview.part_runs(runs, overview.PART_ONE)["experiment"]
    assert "teachers · airbench94" in set(exp) and "6 strong teacher · KD" in set(exp)


def test_published_rows_take_the_book_runs_of_the_same_recipe_on_the_original_pixels():
    runs = _runs([{"chapter": "baseline", "method": "ce", "seed": s, "data_source": "cifar10-png",
                   "test_acc": 70.0 + s / 2} for s in range(5)]
                 + [{"chapter": "baseline", "method": "ce", "seed": s, "data_source": "cifar10-jpeg",
                     "test_acc": 60.0} for s in range(5)]
                 + [{"chapter": "baseline", "method": "ce", "seed": 0, "epochs": 20,   # another recipe, 1 seed
                     "data_source": "cifar10-png", "test_acc": 80.0}])
    table = overview.published_table(runs).set_index("row")
    ce = table.loc["R5 student, CE"]
    assert (ce["published (%)"], ce["this book (%)"], ce["seeds"], ce["range (%)"]) == (70.41, 71.0, 5, "70.00–72.00")
    assert ce["book − published"] == round(71.0 - 70.41, 2)
    assert table.loc["airbench94", "device"] == "not run" and table.loc["airbench94", "seeds"] == 0


def test_devices_are_named_short():
    assert overview.short_device("cpu (2 threads, AMD EPYC, AVX2)") == "CPU, AVX2"
    assert overview.short_device("cuda (NVIDIA H200)") == "GPU, H200"
    assert overview.short_device("mps") == "mps"
