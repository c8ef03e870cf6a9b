"""The benchmark (:mod:`kdutils.tools.bench`) runs end to end in a tiny size, so it cannot rot:
every setup, a few images, one timed step per repeat. The chooser's timings are fixed rates
and freed memory is kept by a stand-in (the real setting would last for the rest of the
session), so that what is checked is the benchmark's own bookkeeping; its timer is checked
against steps of known length."""
import json
import math
import time

import pytest
import torch

from kdutils import speed
from kdutils.tools import bench, chooser

TINY = ["--synthetic", "--batch-size", "4", "--steps", "1", "--repeats", "1", "--warmup", "1",
        "--min-seconds", "0", "--workers", "0", "--device", "cpu"]
RATES = {"fp32 NCHW": 100.0, "fp32 channels_last": 300.0, "bf16 NCHW": 200.0,
         "bf16 channels_last": 50.0}   # the fastest, fp32 channels_last, is admissible on any CPU


@pytest.fixture
def machine(monkeypatch):
    """What the benchmark asked of the machine: the settings timed, the times freed memory was
    kept, and each kdutils row's (keep_memory, times kept before it)."""
    seen = {"timed": [], "kept": [], "kdutils": []}

    def rate(model, batch_size, image_size, dtype, channels_last, steps=1):
        seen["timed"].append(speed.setting_name(dtype, channels_last))
        return RATES[seen["timed"][-1]]

    def keep():
        seen["kept"].append(1)
        return True

    def kdutils_row(name, *args, keep_memory=True, **kw):
        seen["kdutils"].append((name, keep_memory, len(seen["kept"])))
        return original(name, *args, keep_memory=keep_memory, **kw)

    original = bench.bench_kdutils
    monkeypatch.setattr(chooser, "step_rate", rate)
    monkeypatch.setattr(bench, "bench_kdutils", kdutils_row)
    for module in (bench, speed):
        monkeypatch.setattr(module, "keep_freed_memory", keep)
    monkeypatch.setattr(bench, "freed_memory_kept", lambda: False)  # as in a fresh process
    monkeypatch.setattr(speed, "freed_memory_kept", lambda: bool(seen["kept"]))
    monkeypatch.delenv("KD_KEEP_MEMORY", raising=False)
    return seen


def _close(a, b):
    return ((a - b).abs() < 1e-9 * b.abs()).all()


def test_bench_runs_every_setup_and_reports_both_styles(capsys, tmp_path, machine):
    out = tmp_path / "bench.json"
    table = bench.main(TINY + ["--out", str(out)])
    saved = json.loads(out.read_text())
    setups = list(bench.SETUPS)
    assert [r["setup"] for r in saved["rows"]] == list(table["setup"]) == setups
    # the command as a page may show it: paths outside the project by their name alone
    assert saved["command"] == f"python -m kdutils.tools.bench {' '.join(TINY)} --out bench.json"
    assert "cpu" in saved["device"] and "(or 0 s) x 1 repeats after 1 warm-up" in saved["context"]
    for col in ("reference img/s", "kdutils img/s", "reference data img/s", "kdutils data img/s",
                "kdutils img/s, memory returned", "reference img/s, memory kept"):
        assert table[col].map(math.isfinite).all() and (table[col] > 0).all(), col
    # the ratios are the ones of the rates beside them
    assert _close(table["speed-up"], table["kdutils img/s"] / table["reference img/s"])
    assert _close(table["speed-up, memory kept in both"],
                  table["kdutils img/s"] / table["reference img/s, memory kept"])
    assert _close(table["speed-up, memory returned in both"],
                  table["kdutils img/s, memory returned"] / table["reference img/s"])
    byot = table.set_index("setup").loc["resnet18_byot"]
    assert byot["data img/s, AutoAugment per image"] > 0
    assert math.isclose(byot["data speed-up"],
                        byot["kdutils data img/s"] / byot["data img/s, AutoAugment per image"])
    # kdutils ran in the setting the chooser measured fastest, both times, and says so
    assert (table["kdutils setting"] == "fp32 channels_last").all()
    assert (table["kdutils setting, memory returned"] == "fp32 channels_last").all()
    assert (table["choosing (s)"] >= 0).all()
    admissible = 4 if chooser.cpu_native_bf16(chooser.cpu_flags()) else 2   # bf16 only where native
    assert len(machine["timed"]) == 2 * len(setups) * admissible   # chosen afresh for every row
    # first every setup with memory returned, then memory kept once, then kdutils asking for it
    assert machine["kdutils"] == ([(s, False, 0) for s in setups]
                                  + [(s, True, 1 + i) for i, s in enumerate(setups)])
    printed = capsys.readouterr().out
    assert printed.count("(memory returned)") == len(setups) and "speed-up" in printed


def test_bench_without_autocast_times_fp32_only_and_says_when_memory_was_already_kept(
        tmp_path, machine, monkeypatch):
    fixed = bench.main(TINY + ["--no-amp", "--setups", "lightnn_ce", "--out", "-"])
    assert fixed["kdutils setting"].iloc[0] == "fp32 channels_last"
    assert set(machine["timed"]) == {"fp32 NCHW", "fp32 channels_last"}   # bf16 never considered
    # where memory was kept before the reference ran, kdutils is timed once and the file says so
    monkeypatch.setattr(bench, "freed_memory_kept", lambda: True)
    out = tmp_path / "bench.json"
    bench.main(TINY + ["--setups", "lightnn_ce", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["context"].endswith("freed memory already kept when the reference ran")
    row = saved["rows"][0]
    assert row["kdutils img/s"] > 0 and math.isclose(row["speed-up"], row["kdutils img/s"] / row["reference img/s"])
    for col in ("kdutils img/s, memory returned", "reference img/s, memory kept",
                "speed-up, memory kept in both", "speed-up, memory returned in both"):
        assert col not in row, col


def test_the_timer_repeats_short_steps_until_they_last_and_takes_the_median():
    seen = []

    def train(batches):   # a step of at least 10 ms
        for b in batches:
            seen.append(b)
            time.sleep(0.01)

    rate = bench.time_batches(train, lambda: range(3), torch.device("cpu"), warmup=2, steps=1,
                              repeats=3, batch_size=4, min_seconds=0)
    assert seen == [0, 1, 2, 0, 1, 2]          # warm-up 2, probe 1, 3 repeats of 1: batches restart
    assert 4 / 0.01 / 5 < rate <= 4 / 0.01     # 4 images per >= 10 ms
    seen.clear()
    rate = bench.time_batches(train, lambda: range(3), torch.device("cpu"), warmup=1, steps=1,
                              repeats=2, batch_size=4, min_seconds=0.2)
    per_repeat = (len(seen) - 2) / 2           # a 10 ms step is repeated to last 0.2 s
    assert per_repeat == int(per_repeat) and 2 <= per_repeat <= 20
    assert 4 / 0.01 / 5 < rate <= 4 / 0.01


def test_bench_names_its_file_by_the_kind_of_machine():
    kind = bench.device_kind(torch.device("cpu"))
    assert kind == "cpu-" + torch.backends.cpu.get_cpu_capability().lower()


@pytest.mark.parametrize("bad", [["--batch-size", "0"], ["--repeats", "0"], ["--min-seconds", "-1"]])
def test_bench_refuses_bad_sizes(bad):
    with pytest.raises(SystemExit):
        bench.main(["--synthetic", *bad])
