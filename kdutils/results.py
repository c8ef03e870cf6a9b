"""Run records: one JSON file per training run, and tables made from them (chapter 2 on).

A record says what produced a number: chapter, method, profile, device, data source, seed,
epochs, the final test accuracy, the per-epoch history, the wall time, the hyper-parameters
and the PyTorch version.
"""
from __future__ import annotations

import datetime as _dt
import json
import platform
from dataclasses import asdict
from pathlib import Path

import torch

from . import settings
from .checkpoint import atomic_write_json
from .models import arch_name, count_params, flops_per_image

REQUIRED = ("chapter", "method", "profile", "device", "data_source", "seed", "epochs",
            "test_acc", "history", "wall_time_s", "params", "torch_version")


def cpu_model() -> str:
    """The CPU's model name as the operating system reports it (``AMD EPYC``), else the
    machine type (``x86_64``)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """``cuda (NVIDIA L4)``, ``cpu (2 threads, AMD EPYC, AVX2)``, ``mps``: the device and
    what it is; for a CPU, its model and the vector instructions PyTorch uses on it."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return (f"cpu ({torch.get_num_threads()} threads, {cpu_model()}, "
                f"{torch.backends.cpu.get_cpu_capability()})")
    return device.type


def make_record(*, chapter, method, profile, device, data, recipe, params, history, model,
                key, teacher_key, wall_time_s, extra: dict | None = None) -> dict:
    deployed = getattr(model, "deployed", model)  # e.g. a student without its training-only regressor
    size = data.train_x.shape[-1]
    return {
        "chapter": chapter, "method": method, "profile": profile,
        "device": device_name(device), "data_source": data.source,
        "train_size": len(data.train_y), "test_size": len(data.test_y),
        "seed": recipe.seed, "epochs": recipe.epochs,
        "test_acc": history[-1]["test_acc"] if history else None,
        "history": history, "wall_time_s": round(wall_time_s, 2),
        "params": {**asdict(recipe), **params},
        "model": type(deployed).__name__, "arch": arch_name(deployed),
        "model_params": count_params(deployed),
        "train_model": type(model).__name__,  # what was trained (and keyed), e.g. with a regressor
        "train_params": count_params(model),
        "mflops_per_image": round(flops_per_image(deployed, size) / 1e6, 2), "image_size": size,
        "teacher_key": teacher_key, "run_key": key, **(extra or {}),
        "torch_version": torch.__version__,
        "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def describe_teacher(run) -> str:
    """One line on a teacher a chapter loaded or trained: its accuracy and what produced it
    (epochs, training images, device, minutes of training)."""
    r = run.record
    epochs = f"{r['epochs']} epoch{'s' if r['epochs'] != 1 else ''}"
    return (f"teacher {r['method']}: {r['test_acc']:.2f}% test accuracy ({epochs} over "
            f"{r['train_size']:,} training images, {r['device']}, {r['wall_time_s'] / 60:.1f} min of training)")


def write_record(record: dict, path: str | Path) -> Path:
    """Write ``record`` atomically as JSON; returns the path."""
    missing = [k for k in REQUIRED if k not in record]
    if missing:
        raise ValueError(f"run record lacks {', '.join(missing)}")
    atomic_write_json(record, path)
    return Path(path)


# Recipe fields added after runs were recorded without them: they enter a run's key and
# identity only when set, so that those runs keep their names (Recipe.key uses them too).
OPTIONAL_RECIPE_FIELDS = {"autoaugment": False, "erasing": 0.0, "views": 0, "view_seed": 0}

IDENTITY_FIELDS = ("chapter", "method", "profile", "data_source", "train_size", "test_size",
                   "teacher_key", "model")


def identity(record: dict) -> str:
    """What makes a run the run it is, apart from its seed: chapter, method, profile, data,
    teacher, network and every parameter but ``seed``. Runs with the same identity and
    different seeds are repetitions of one experiment; anything else is another experiment."""
    params = _params_but_seed(record.get("params"))
    fields = {k: record.get(k) for k in IDENTITY_FIELDS}
    return json.dumps({**fields, "params": params}, sort_keys=True, default=str)


def _params_but_seed(params: dict | None) -> dict:
    """A record's parameters without the seed and without optional recipe fields left at
    their defaults (a record written before such a field existed describes the same run)."""
    return {k: v for k, v in (params or {}).items()
            if k != "seed" and not (k in OPTIONAL_RECIPE_FIELDS and v == OPTIONAL_RECIPE_FIELDS[k])}


def _variants(frame) -> list[str]:
    """A short label per row naming what tells its run apart from the other runs of the same
    chapter and method (``"fraction=0.05"``, ``"hook_weight=0.0"``), or ``""``."""
    labels = [""] * len(frame)
    for _, group in frame.groupby(["chapter", "method"], sort=False):
        if group["identity"].nunique() < 2:
            continue
        params = [_params_but_seed(p) for p in group["params"]]
        keys = sorted({k for p in params for k in p})
        differ = [k for k in keys if len({json.dumps(p.get(k), default=str) for p in params}) > 1]
        other = [k for k in ("teacher_key", "train_size", "profile", "data_source")
                 if group[k].nunique() > 1]
        for pos, (i, p) in zip(group.index, enumerate(params)):
            bits = [f"{k}={p.get(k)}" for k in differ]
            bits += [f"{k}={group.loc[pos, k]}" for k in other]
            labels[frame.index.get_loc(pos)] = ", ".join(bits)
    return labels


def _with_identity(frame):
    if len(frame) and "identity" not in frame:
        frame["identity"] = [identity(r) for r in frame.to_dict("records")]
        frame["variant"] = _variants(frame)
    return frame


def relabel(frame):
    """``frame`` with ``identity`` and ``variant`` recomputed over its own rows, so that each
    label names only what tells apart the runs it is shown with (a figure of one profile, say)."""
    return _with_identity(frame.drop(columns=["identity", "variant"], errors="ignore").copy())


def load_records(results_dir=None, chapter: str | None = None):
    """Every run record under ``results_dir`` (default ``<project>/results``) as a DataFrame.

    One row per run; the ``history`` column keeps the per-epoch list. Unreadable files are
    reported by name, not skipped silently.
    """
    import pandas as pd
    root = settings.results_dir(results_dir)
    rows = []
    for path in sorted(root.rglob("*.json")):
        try:
            rec = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"run record {path} is not valid JSON ({e}); delete or restore it")
        if not all(k in rec for k in REQUIRED):
            continue
        if chapter is None or rec["chapter"] == chapter:
            rec["path"] = str(path)
            rows.append(rec)
    return _with_identity(pd.DataFrame(rows))


def to_frame(runs):
    """The records of ``runs`` (what :func:`kdutils.train.fit` returned) as a DataFrame,
    one row per run, with the same columns as :func:`load_records`."""
    import pandas as pd
    return _with_identity(pd.DataFrame([{**r.record, "path": str(r.record_path)} for r in runs]))


def summarize(records, by=("chapter", "method")):
    """Mean and standard deviation of the final test accuracy over seeds, per method.

    Only seeds of the same run are averaged: within each group of ``by``, runs whose
    :func:`identity` differs (another loss weight, another teacher, another data size) get a
    row of their own, named by ``variant``. Returns one row per group with ``acc_mean``, ``acc_std`` (sample std, ddof=1; NaN for one
    seed), ``seeds`` (how many), ``epochs``, ``profile``, ``device``, ``data_source`` and the
    mean ``wall_time_s``.
    """
    import pandas as pd
    if len(records) == 0:
        return pd.DataFrame()
    by = list(by)
    records = _with_identity(records.copy())
    aggregations = dict(variant=("variant", "first"),
                        acc_mean=("test_acc", "mean"), acc_std=("test_acc", "std"),
                        seeds=("seed", "nunique"), epochs=("epochs", "first"),
                        profile=("profile", "first"), device=("device", "first"),
                        data_source=("data_source", "first"), wall_time_s=("wall_time_s", "mean"),
                        model_params=("model_params", "first"))
    out = records.groupby(by + ["identity"], sort=False).agg(
        **{k: v for k, v in aggregations.items() if k not in by})
    return out.reset_index().drop(columns="identity")


def format_acc(mean: float, std: float) -> str:
    """``70.52 ± 0.31`` (or ``70.52`` when there is one seed)."""
    if std != std:  # NaN
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {std:.2f}"


def interval_verdict(low: float, high: float) -> str:
    """What a 95% interval of a paired difference shows, in words: a gain (interval above
    zero), a loss (below zero), or no detectable difference (it contains zero)."""
    if low != low or high != high:  # NaN: fewer than two paired seeds
        return "too few paired seeds to tell"
    if low > 0:
        return "the interval lies above zero, a gain"
    if high < 0:
        return "the interval lies below zero, a loss"
    return "the interval contains zero, no detectable difference"


def paired_comparison(records, baseline: str, label: str = "method", confidence: float = 0.95):
    """Each method against ``baseline``, paired by seed (same initial weights, same batches).

    For every method: mean ± std of its accuracy, and of its difference to the baseline over
    the seeds both share, with a ``confidence`` interval from Student's t distribution
    (``n - 1`` degrees of freedom). ``significant`` is True when the interval excludes 0.
    """
    import pandas as pd

    records = _with_identity(records.copy())
    for name, group in records.groupby(label, sort=False):
        if group["identity"].nunique() > 1 or group["seed"].duplicated().any():
            raise ValueError(f"{label} {name!r} holds runs of different experiments "
                             f"({', '.join(sorted(set(group['variant'])))}); compare one at a time")
    base = records[records[label] == baseline].set_index("seed")["test_acc"]
    rows = []
    for name, group in records.groupby(label, sort=False):
        acc = group.set_index("seed")["test_acc"]
        row = {label: name, "seeds": len(acc), "acc_mean": acc.mean(), "acc_std": acc.std()}
        shared = acc.index.intersection(base.index)
        if name != baseline and len(shared) >= 2:
            row.update(paired_interval(acc[shared] - base[shared], confidence))
        rows.append(row)
    return pd.DataFrame(rows)


def by_profile(students, teachers, baseline: str = "ce", method: str = "kd"):
    """A chapter at every scale it was run at: one row per profile of ``students`` (smoke runs
    left out), with the device, the teacher that ``method``'s runs learned from (its accuracy
    and training images, found by its run key in ``teachers``), the students' training images
    and seeds, both students' mean accuracy, and ``method`` - ``baseline`` paired by seed with
    its 95% interval."""
    import pandas as pd
    rows = []
    for profile, group in students[students.profile != "smoke"].groupby("profile", sort=False):
        comp = paired_comparison(group, baseline).set_index("method")
        keys = set(group.loc[group.method == method, "teacher_key"])
        teacher = teachers[teachers.run_key.isin(keys)]
        if len(teacher) != 1:
            raise ValueError(f"profile {profile!r}: the {method} runs learned from {len(keys)} "
                             f"teacher(s), {len(teacher)} found among the teacher records")
        rows.append({"profile": profile, "device": group.device.iloc[0],
                     "teacher (%)": teacher.test_acc.iloc[0],
                     "teacher images": int(teacher.train_size.iloc[0]),
                     "student images": int(group.train_size.iloc[0]),
                     "seeds": int(comp.loc[method, "seeds"]),
                     f"{baseline} (%)": comp.loc[baseline, "acc_mean"],
                     f"{method} (%)": comp.loc[method, "acc_mean"],
                     **{k: comp.loc[method, k] for k in ("diff_mean", "ci_low", "ci_high")}})
    columns = ["profile", "device", "teacher (%)", "teacher images", "student images", "seeds",
               f"{baseline} (%)", f"{method} (%)", "diff_mean", "ci_low", "ci_high"]
    return pd.DataFrame(rows, columns=columns).set_index("profile")


def paired_interval(differences, confidence: float = 0.95) -> dict:
    """Mean and spread of per-seed ``differences`` (each a paired run minus its baseline), with a
    ``confidence`` interval from Student's t distribution (n - 1 degrees of freedom):
    ``{"diff_mean", "diff_std", "ci_low", "ci_high", "significant"}`` (``significant``: the
    interval excludes 0). Fewer than two differences have no interval (NaN bounds)."""
    import pandas as pd
    from scipy import stats
    d = pd.Series(differences, dtype="float64")
    mean = d.mean()
    if len(d) < 2:
        return {"diff_mean": mean, "diff_std": float("nan"), "ci_low": float("nan"),
                "ci_high": float("nan"), "significant": False}
    std = d.std()
    half = stats.t.ppf(0.5 + confidence / 2, len(d) - 1) * std / len(d) ** 0.5
    return {"diff_mean": mean, "diff_std": std, "ci_low": mean - half, "ci_high": mean + half,
            "significant": bool(abs(mean) > half)}


def interaction(records, *, by: str, low, high, method: str, baseline: str,
                label: str = "method", confidence: float = 0.95) -> dict:
    """How much ``method``'s gain over ``baseline`` changes when column ``by`` goes from ``low``
    to ``high`` (a difference of differences): per seed, (method - baseline at ``high``) -
    (method - baseline at ``low``), with its ``confidence`` interval (:func:`paired_interval`)
    over the seeds that have all four runs. Positive: the gain grows."""
    acc = records.pivot_table(index="seed", columns=[by, label], values="test_acc")
    missing = [(v, m) for v in (low, high) for m in (method, baseline) if (v, m) not in acc]
    if missing:
        raise ValueError(f"no runs for {', '.join(f'{label}={m!r} at {by}={v!r}' for v, m in missing)}")
    d = (acc[(high, method)] - acc[(high, baseline)]) - (acc[(low, method)] - acc[(low, baseline)])
    return {**paired_interval(d.dropna(), confidence), "seeds": int(d.notna().sum())}
