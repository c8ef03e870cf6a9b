"""The benchmark runs end to end in a tiny size, so it cannot rot."""
import json

import pytest

from kdutils import bench


def test_bench_runs_every_setup_and_reports_both_styles(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "freed_memory_kept", lambda: False)  # as in a fresh process
    out = tmp_path / "bench.json"
    table = bench.main(["--synthetic", "--batch-size", "8", "--steps", "1", "--repeats", "1",
                        "--warmup", "1", "--workers", "0", "--device", "cpu", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert [r["setup"] for r in saved["rows"]] == list(bench.SETUPS)
    assert saved["command"].startswith("python -m kdutils.bench --synthetic") and "cpu" in saved["device"]
    assert list(table["setup"]) == list(bench.SETUPS)
    for col in ("reference img/s", "kdutils img/s", "reference data img/s", "kdutils data img/s",
                "kdutils img/s, memory returned", "reference img/s, memory kept"):
        assert (table[col] > 0).all(), col
    both = table["kdutils img/s"] / table["reference img/s, memory kept"]
    assert ((table["speed-up, memory kept in both"] - both).abs() < 1e-9).all()
    assert table["kdutils setting, memory returned"].notna().all()
    assert ((table["speed-up"] - table["kdutils img/s"] / table["reference img/s"]).abs() < 1e-9).all()
    assert "speed-up" in capsys.readouterr().out
    # the kdutils side runs in the setting the loop would pick on this CPU, and says which
    assert all(r["kdutils setting"] in ("fp32 NCHW", "fp32 channels_last", "bf16 NCHW",
                                        "bf16 channels_last") for r in saved["rows"])
    fixed = bench.main(["--synthetic", "--batch-size", "8", "--steps", "1", "--repeats", "1",
                        "--warmup", "1", "--workers", "0", "--device", "cpu", "--no-amp",
                        "--setups", "lightnn_ce", "--out", "-"])
    assert fixed["kdutils setting"].iloc[0].startswith("fp32")
    # where memory was kept before the reference ran, kdutils is timed once and the file says so
    monkeypatch.setattr(bench, "freed_memory_kept", lambda: True)
    bench.main(["--synthetic", "--batch-size", "8", "--steps", "1", "--repeats", "1", "--warmup", "1",
                "--workers", "0", "--device", "cpu", "--setups", "lightnn_ce", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["context"].endswith("freed memory already kept when the reference ran")
    assert "kdutils img/s, memory returned" not in saved["rows"][0]
    assert "reference img/s, memory kept" not in saved["rows"][0]


def test_bench_names_its_file_by_the_kind_of_machine():
    import torch
    kind = bench.device_kind(torch.device("cpu"))
    assert kind == "cpu-" + torch.backends.cpu.get_cpu_capability().lower()


def test_bench_refuses_bad_sizes():
    with pytest.raises(SystemExit):
        bench.main(["--synthetic", "--batch-size", "0"])
