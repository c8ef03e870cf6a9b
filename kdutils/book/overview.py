"""The Results chapter's tables: the book's current runs per part, and its numbers beside the
published ones. Nothing here trains; everything reads run records
(:func:`kdutils.results.load_records`)."""
from __future__ import annotations

import pandas as pd

from ..results import relabel, summarize

PART_ONE = ("baseline", "hinton_kd", "cosine_hidden_state", "intermediate_regressor",
            "when_distillation_pays")
PART_TWO = ("resnet50_to_resnet18", "self_distillation", "pretrained_teacher")
CHAPTER_NAMES = {"teacher": "teachers", "baseline": "2 baseline", "hinton_kd": "3 Hinton KD",
                 "cosine_hidden_state": "4 cosine", "intermediate_regressor": "5 hint",
                 "when_distillation_pays": "6 strong teacher", "resnet50_to_resnet18": "8 ResNet50→18",
                 "self_distillation": "9 self-distillation", "pretrained_teacher": "10 pretrained",
                 "appendix_fast": "appendix: fast", "appendix_scale_out": "appendix: scale-out"}
METHOD_NAMES = {"ce": "CE", "kd": "KD", "cosine": "cosine", "hint": "hint", "byot": "BYOT",
                "hook_sd": "hooks", "feature_kd": "feature KD", "deepnn": "DeepNN",
                "airbench": "airbench94", "resnet50": "ResNet50", "dkd": "DKD"}
DEVICE_NAMES = (("AVX512", "CPU, AVX512"), ("AVX2", "CPU, AVX2"), ("H200", "GPU, H200"),
                ("H100", "GPU, H100"), ("L4", "GPU, L4"), ("A100", "GPU, A100"))
# the teachers of Part I (the others are Part II's)
PART_ONE_TEACHERS = ("deepnn", "airbench")
# the runs of chapter 6 comparable with Part I: R5's recipe (all labels, its epochs)
R5_EPOCHS = 10


def current(records, preferred: str = "cifar10-png"):
    """The records a page of the book shows now: for each chapter and profile, its runs on
    ``preferred`` data where it has any, else its others (a chapter not yet re-run). Returns
    ``(shown, superseded)``."""
    keep = records.groupby(["chapter", "profile"])["data_source"].transform(
        lambda s: (s == preferred) if (s == preferred).any() else pd.Series(True, index=s.index))
    return records[keep], records[~keep]


def short_device(device: str) -> str:
    """``cpu (2 threads, Intel(R) Xeon(R) Processor, AVX512)`` -> ``CPU, AVX512``."""
    for needle, short in DEVICE_NAMES:
        if needle in str(device):
            return short
    return str(device).split(" (")[0]


def in_overview(records):
    """Which runs a part's table shows: every run but chapter 6's regime experiments (few
    labels, the grid, fixed views), which its own page compares; its runs under R5's recipe
    stay, being comparable with Part I."""
    return [c != "when_distillation_pays" or (p.get("fraction") == 1.0 and e == R5_EPOCHS)
            for c, p, e in zip(records["chapter"], records["params"], records["epochs"])]


def teacher_names(records) -> dict:
    """``teacher_key=<run key>`` -> ``teacher: <its network, seed, label smoothing>``, for the
    teachers among ``records`` (a regular-expression replacement map for variant labels)."""
    names = {}
    for rec in records[records["chapter"] == "teacher"].itertuples():
        smoothing = (rec.params or {}).get("label_smoothing")
        name = f"{METHOD_NAMES.get(rec.method, rec.method)} seed {rec.seed}"
        names[f"teacher_key={rec.run_key}"] = "teacher: " + name + (", no smoothing" if smoothing == 0 else "")
    return names


def part_runs(records, chapters):
    """The runs a part's table and figure show (:func:`kdutils.book.overview.in_overview`): ``chapters``' runs and
    their teachers, each with ``variant`` (what tells it apart from the runs of its chapter,
    method, profile and data, teachers by name) and ``experiment``, a short label, ordered as
    the book is."""
    part_one = "baseline" in chapters
    teachers = (records["chapter"] == "teacher") & (records["method"].isin(PART_ONE_TEACHERS) == part_one)
    part = records[records["chapter"].isin(chapters) | teachers]
    part = part[in_overview(part)]
    if part.empty:
        return part.assign(experiment=[])
    part = pd.concat([relabel(g) for _, g in part.groupby(["chapter", "method", "profile", "data_source"])])
    part["variant"] = part["variant"].replace(teacher_names(records), regex=True)
    order = {c: i for i, c in enumerate(("teacher",) + tuple(chapters))}
    part = part.assign(_order=part["chapter"].map(order)).sort_values(["_order", "profile", "method"])
    part["experiment"] = [
        f"{CHAPTER_NAMES.get(c, c)} · {METHOD_NAMES.get(m, m)}" + (f" ({v})" if v else "")
        + ("" if p == "full" else f" [{p}]")
        for c, m, v, p in zip(part["chapter"], part["method"], part["variant"], part["profile"])]
    return part.drop(columns="_order")


def part_table(records, chapters) -> pd.DataFrame:
    """One row per experiment of ``chapters`` and of their teachers (:func:`kdutils.book.overview.part_runs`):
    accuracy as mean ± std over seeds, seeds, epochs, parameters, MFLOPs per image, minutes per
    run, device, profile and data, with short names."""
    part = part_runs(records, chapters)
    if part.empty:
        return pd.DataFrame()
    table = summarize(part, by=["experiment", "chapter", "method", "profile", "data_source"])
    flops = part.groupby("experiment")["mflops_per_image"].first()
    return pd.DataFrame({
        "chapter": table["chapter"].map(lambda c: CHAPTER_NAMES.get(c, c)),
        "method": table["method"].map(lambda m: METHOD_NAMES.get(m, m)),
        "variant": table["variant"],
        "accuracy (%)": [f"{m:.2f}" + ("" if pd.isna(s) else f" ± {s:.2f}")
                         for m, s in zip(table["acc_mean"], table["acc_std"])],
        "seeds": table["seeds"], "epochs": table["epochs"],
        "parameters": table["model_params"].map(lambda n: f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n / 1e3:.0f} k"),
        "MFLOPs": table["experiment"].map(flops).round(1),
        "min / run": (table["wall_time_s"] / 60).round(1),
        "device": table["device"].map(short_device), "profile": table["profile"],
        "data": table["data_source"].str.replace("cifar10-", "", regex=False),
    }).reset_index(drop=True)


# (row, what was run, published %, its source, how to find the book's runs of the same recipe)
PUBLISHED = [
    ("R5 teacher", "DeepNN, Adam 1e-3, batch 128, 10 epochs, no augmentation", 75.60,
     "PyTorch KD tutorial", {"chapter": "teacher", "method": "deepnn", "epochs": 10}),
    ("R5 student, CE", "LightNN, same recipe", 70.41, "PyTorch KD tutorial",
     {"chapter": "baseline", "method": "ce"}),
    ("R5 student, KD", "LightNN, T = 5, α = 0.5", 70.19, "PyTorch KD tutorial",
     {"chapter": "hinton_kd", "method": "kd"}),
    ("R5 student, cosine", "LightNN, cosine loss 0.3 + CE 0.7", 70.87, "PyTorch KD tutorial",
     {"chapter": "cosine_hidden_state", "method": "cosine"}),
    ("R5 student, hint", "LightNN, regressor MSE 0.7 + CE 0.3", 71.40, "PyTorch KD tutorial",
     {"chapter": "intermediate_regressor", "method": "hint"}),
    ("airbench94", "airbench94, 9.9 epochs, label smoothing 0.2, TTA", 94.01, "Jordan 2024",
     {"chapter": "teacher", "method": "airbench", "epochs": 9.9, "label_smoothing": 0.2}),
    ("R2 student", "ResNet18 from ResNet50, KD, 200 epochs", 94.2, "R2 (chapter 1)",
     {"chapter": "resnet50_to_resnet18", "method": "kd", "epochs": 200}),
    ("R1 deepest exit", "ResNet18 BYOT, 200 epochs", 94.4, "R1 (chapter 1)",
     {"chapter": "self_distillation", "method": "byot", "epochs": 200}),
]


def matching(records, spec: dict):
    """The runs of one experiment that match ``spec`` (record fields, or recipe parameters):
    of several, the one with the most seeds."""
    keep = pd.Series(True, index=records.index)
    for key, value in spec.items():
        column = records[key] if key in records else records["params"].map(lambda p: p.get(key))
        keep &= column == value
    runs = records[keep]
    if runs.empty:
        return runs
    best = runs.groupby("identity")["seed"].nunique().idxmax()
    return runs[runs["identity"] == best]


def published_runs(records, data_source: str = "cifar10-png") -> dict:
    """Per row of ``PUBLISHED``: the book's runs of the same network and recipe on
    ``data_source`` (:func:`matching`; empty where no profile runs the recipe)."""
    records = records[records["data_source"] == data_source]
    return {name: matching(records, spec) if len(records) else records
            for name, *_, spec in PUBLISHED}


def published_table(records, data_source: str = "cifar10-png") -> pd.DataFrame:
    """The book's runs on ``data_source`` beside the published figure for the same network and
    recipe (:func:`published_runs`): measured mean, seeds, min-max, and measured - published.
    A recipe no profile runs shows no measurement."""
    runs_of = published_runs(records, data_source)
    rows = []
    for name, what, published, source, _ in PUBLISHED:
        runs = runs_of[name]
        acc = runs["test_acc"] if len(runs) else pd.Series(dtype=float)
        rows.append({"row": name, "network and recipe": what, "published (%)": published,
                     "source": source,
                     "this book (%)": round(acc.mean(), 2) if len(acc) else None,
                     "seeds": len(acc), "range (%)": f"{acc.min():.2f}–{acc.max():.2f}" if len(acc) > 1 else "",
                     "book − published": round(acc.mean() - published, 2) if len(acc) else None,
                     "device": short_device(runs["device"].iloc[0]) if len(acc) else "not run"})
    return pd.DataFrame(rows)
