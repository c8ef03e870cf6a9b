"""Pages against records: a number a page glues with its runs is recomputed from their records.

A chapter glues a statistic of its runs with :func:`kdutils.book.notebook.glue_stat`: the value
is computed here, by :func:`stat`, from the runs' records, and the page keeps beside it the
run keys it came from (glued as ``<name>__runs``). :func:`audit_page` reads an executed page,
finds those records in ``results/`` by key and recomputes every such value. A page and the
records disagree when

* a value differs from its recomputation (a record was overwritten or edited after the page
  ran), or a run it names has no record any more;
* the records hold more seeds of an experiment the page shows than the page used (a page that
  shows 3 seeds of a 5-seed comparison).
"""
from __future__ import annotations

import ast
import re
import json
import math
from pathlib import Path

from ..results import load_records, paired_interval

STATS = ("mean", "std", "min", "max", "seeds", "diff", "ci_low", "ci_high", "minutes")
SUFFIX = "__runs"


def stat(name: str, arm, baseline=None) -> float:
    """Statistic ``name`` of the runs ``arm`` (a frame of records: ``seed``, ``test_acc``,
    ``wall_time_s``): their test accuracy's mean, std, min or max, their number of seeds, their
    total minutes of training, or, against ``baseline`` paired by seed, the mean difference
    and its 95% interval (``diff``, ``ci_low``, ``ci_high``)."""
    if name not in STATS:
        raise ValueError(f"unknown statistic {name!r}; known: {', '.join(STATS)}")
    acc = arm.set_index("seed")["test_acc"].astype(float)
    if name in ("diff", "ci_low", "ci_high"):
        if baseline is None:
            raise ValueError(f"statistic {name!r} needs a baseline to pair with")
        base = baseline.set_index("seed")["test_acc"].astype(float)
        shared = acc.index.intersection(base.index)
        return float(paired_interval(acc[shared] - base[shared])[
            {"diff": "diff_mean", "ci_low": "ci_low", "ci_high": "ci_high"}[name]])
    if name == "seeds":
        return int(acc.index.nunique())
    if name == "minutes":
        return float(arm["wall_time_s"].sum() / 60)
    return float(getattr(acc, name)())


def sources(arm, baseline=None) -> dict:
    """What a glued statistic came from: the run keys of ``arm`` and ``baseline``."""
    return {"arm": sorted(arm["run_key"]), "baseline": None if baseline is None else sorted(baseline["run_key"])}


def glued(page: str | Path) -> dict:
    """Every value a page glued, by name (myst-nb's ``application/papermill.record`` outputs)."""
    values = {}
    for cell in json.loads(Path(page).read_text())["cells"]:
        for out in cell.get("outputs", []):
            name = out.get("metadata", {}).get("scrapbook", {}).get("name")
            text = out.get("data", {}).get("application/papermill.record/text/plain")
            if name and text is not None:
                try:
                    values[name] = ast.literal_eval(text)
                except (ValueError, SyntaxError):
                    values[name] = text
    return values


def audit_page(page: str | Path, results_dir=None, records=None) -> list[str]:
    """What disagrees between an executed page and the records (empty: nothing). ``records``:
    :func:`kdutils.results.load_records` of ``results_dir``, when already loaded."""
    records = load_records(results_dir) if records is None else records
    by_key = records.set_index("run_key") if len(records) else None
    values, problems = glued(page), []
    for name, runs in values.items():
        if not name.endswith(SUFFIX) or name[: -len(SUFFIX)] not in values:
            continue
        name, spec = name[: -len(SUFFIX)], json.loads(runs)
        frames = {}
        for part in ("arm", "baseline"):
            keys = spec.get(part)
            if keys is None:
                continue
            missing = [k for k in keys if by_key is None or k not in by_key.index]
            if missing:
                problems.append(f"{name}: no record of run(s) {', '.join(missing)}")
                break
            frame = records[records["run_key"].isin(keys)]
            unshown = records[records["identity"].isin(set(frame["identity"]))
                              & ~records["run_key"].isin(keys)]
            if len(unshown):
                problems.append(f"{name}: the records hold seed(s) {sorted(unshown['seed'].tolist())} "
                                f"of the same experiment that the page does not show")
            frames[part] = frame
        else:
            value = stat(spec["stat"], frames["arm"], frames.get("baseline"))
            shown = values[name]
            if not (isinstance(shown, (int, float)) and math.isclose(shown, value, rel_tol=1e-9, abs_tol=1e-9)
                    or (isinstance(shown, float) and math.isnan(shown) and math.isnan(value))):
                problems.append(f"{name}: the page shows {shown!r}, its records give {value!r}")
    return problems


# a machine's own folders: what a page must never show (a reader's paths are not the book's)
MACHINE_PATH = re.compile(r"(?<![\w.~])(/root|/home/[^/\s]+|/Users/[^/\s]+|/work|/tmp|/content|/check"
                          r"|/private|/var/folders|[A-Za-z]:\\{1,2}Users)(?=[/\\])")


def machine_paths(page: str | Path) -> list[str]:
    """Each place an executed page's outputs show a machine's own path (a home, a checkout, a
    temporary folder), as ``cell N: ...text around it...``."""
    found = []
    for i, cell in enumerate(json.loads(Path(page).read_text())["cells"]):
        for out in cell.get("outputs", []):
            texts = [out.get("text", "")] + [v for k, v in out.get("data", {}).items()
                                             if k.startswith("text/") or "record" in k]
            for text in texts:
                text = "".join(text) if isinstance(text, list) else str(text)
                for m in MACHINE_PATH.finditer(text):
                    found.append(f"cell {i}: ...{text[max(0, m.start() - 40):m.end() + 40]}...")
    return found
