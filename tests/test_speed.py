"""How fast a run trains: the core's :class:`kdutils.speed.Speed` (precision, layout, freed
memory, an injected chooser) and the CPU setting chooser of :mod:`kdutils.tools.chooser`: what
it may pick, how it picks, what it records. Timings are replaced by fixed rates wherever a
decision is checked, so no test depends on the CPU it runs on."""
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kdutils as kd
from kdutils import settings
from kdutils import speed as sp
from kdutils.data import ImageData
from kdutils.settings import RunOptions
from kdutils.speed import Speed
from kdutils.tools import chooser as ch
from kdutils.train import Recipe

CPU = torch.device("cpu")


def _tiny(n_train=48, n_test=16):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n_train + n_test) % 10
    x = torch.randint(0, 256, (n_train + n_test, 3, 32, 32), dtype=torch.uint8, generator=g)
    return ImageData(x[:n_train], y[:n_train], x[n_train:], y[n_train:], kd.data.CIFAR10_CLASSES,
                     "synthetic")


@pytest.fixture
def options(tmp_path):
    return RunOptions(ckpt_dir=str(tmp_path / "ck"), results_dir=str(tmp_path / "res"), progress=False)


@pytest.fixture
def kept(monkeypatch):
    """Freed memory kept by a stand-in: the calls Speed makes, never the process-wide setting
    (which would last for every later test of the session); $KD_KEEP_MEMORY unset."""
    calls = []
    monkeypatch.setattr(sp, "keep_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(sp, "freed_memory_kept", lambda: bool(calls))
    monkeypatch.delenv(settings.KEEP_MEMORY_VAR, raising=False)
    return calls


def _fake_rates(table, calls):
    def rate(model, batch_size, image_size, dtype, channels_last, steps=3, warmup=1):
        name = sp.setting_name(dtype, channels_last)
        calls.append(name)
        return table[name]
    return rate


def test_native_bf16_is_read_from_the_cpu_flags():
    info = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_tile\n"
    assert ch.cpu_flags(info) == {"fpu", "sse", "avx2", "avx512f", "avx512_bf16", "amx_tile"}
    assert ch.cpu_native_bf16({"avx2", "avx512_bf16"}) and ch.cpu_native_bf16({"amx_bf16"})
    assert not ch.cpu_native_bf16({"avx2", "avx512f", "avx512_vnni"})
    assert ch.cpu_flags("no flags here") == set()


def test_candidates_follow_the_hardware_and_the_explicit_settings(monkeypatch):
    fp32, bf16 = None, torch.bfloat16
    assert ch.cpu_candidates("auto", None, native_bf16=False) == [(fp32, False), (fp32, True)]
    assert ch.cpu_candidates("auto", None, native_bf16=True) == [
        (fp32, False), (fp32, True), (bf16, False), (bf16, True)]
    assert ch.cpu_candidates("off", None, native_bf16=True) == [(fp32, False), (fp32, True)]
    assert ch.cpu_candidates("auto", False, native_bf16=True) == [(fp32, False), (bf16, False)]
    assert ch.cpu_candidates("bf16", True, native_bf16=False) == [(bf16, True)]  # asked for: obeyed
    monkeypatch.setitem(ch.ACCURACY_EXCLUDED, ("lightnn", "fp32 channels_last"), "measured cost")
    assert ch.cpu_candidates("auto", None, False, arch="lightnn") == [(fp32, False)]
    assert ch.cpu_candidates("auto", None, False, arch="deepnn") == [(fp32, False), (fp32, True)]


def test_the_accuracy_rule_needs_five_seeds_and_reads_the_whole_interval():
    v = ch.accuracy_verdict
    assert v(-0.9, -1.3, -0.6, seeds=5) == "excluded"          # all of it below -0.5
    assert v(-0.9, -1.3, -0.6, seeds=3) == "undecided"         # too few seeds to exclude
    assert v(-0.9, -1.3, -0.4, seeds=5) == "undecided"         # reaches above -0.5
    assert v(-0.29, -0.66, 0.08, seeds=5) == "undecided"       # a cost of 0.5 not ruled out
    assert v(-0.1, -0.4, 0.2, seeds=5) == "may be a default"
    assert v(0.6, 0.2, 1.0, seeds=5) == "undecided"            # a change, if a gain, is a change
    assert v(-0.1, float("nan"), float("nan"), seeds=5) == "undecided"
    assert v(-0.6, -0.75, -0.45, seeds=5, budget=0.4) == "excluded"
    assert ch.ACCURACY_BUDGET == 0.5


def test_fastest_setting_wins_and_a_tie_keeps_the_first():
    assert ch.pick_fastest({"fp32 NCHW": 100.0, "fp32 channels_last": 180.0}) == "fp32 channels_last"
    assert ch.pick_fastest({"fp32 NCHW": 100.0, "bf16 NCHW": 100.0}) == "fp32 NCHW"
    with pytest.raises(ValueError):
        ch.pick_fastest({})


def test_choice_is_measured_once_then_read_from_the_cache(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(ch, "step_rate", _fake_rates(
        {"fp32 NCHW": 100.0, "fp32 channels_last": 150.0, "bf16 NCHW": 300.0,
         "bf16 channels_last": 250.0}, calls))
    net = kd.models.build("lightnn", seed=0)
    cache = tmp_path / "choices.json"
    first = ch.choose_cpu_setting(net, 64, flags={"avx512_bf16"}, cache=cache)
    assert (first["amp"], first["channels_last"]) == (torch.bfloat16, False)
    assert first["choice"]["by"] == "measured" and first["choice"]["setting"] == "bf16 NCHW"
    assert first["choice"]["rates"]["fp32 channels_last"] == 150.0 and len(calls) == 4
    again = ch.choose_cpu_setting(net, 64, flags={"avx512_bf16"}, cache=cache)
    assert again["choice"]["by"] == "cached" and again["choice"]["setting"] == "bf16 NCHW"
    assert len(calls) == 4                                   # nothing timed the second time
    ch.choose_cpu_setting(net, 128, flags={"avx512_bf16"}, cache=cache)
    assert len(calls) == 8                                   # another batch size: timed again
    without_bf16 = ch.choose_cpu_setting(net, 64, flags={"avx2"}, cache=cache)
    assert without_bf16["choice"]["setting"] == "fp32 channels_last" and len(calls) == 10
    only = ch.choose_cpu_setting(net, 64, amp="off", channels_last=False, flags={"avx2"}, cache=cache)
    assert only["choice"] == {"setting": "fp32 NCHW", "by": "only one admissible"} and len(calls) == 10


def test_step_rate_times_a_copy_and_leaves_the_model_alone():
    net = kd.models.build("lightnn", seed=0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    import time
    t0 = time.perf_counter()
    rate = ch.step_rate(net, 8, 32, None, True, steps=1, warmup=1, min_seconds=0.3)
    assert time.perf_counter() - t0 >= 0.3   # a tiny step is repeated until the timing means something
    assert math.isfinite(rate) and rate > 0
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]) and v.is_contiguous(), k


def test_speed_takes_its_chooser_as_a_function_and_stays_frozen():
    assert Speed().measure is False and Speed().chooser is None
    s = Speed(chooser=ch.choose_cpu_setting)
    assert s.measure is True and s.chooser is ch.choose_cpu_setting
    assert s == Speed(chooser=ch.choose_cpu_setting) and s != Speed() and hash(s) == hash(Speed(chooser=ch.choose_cpu_setting))
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.chooser = None
    with pytest.raises(AttributeError):
        s.measure = False                      # read-only: it follows the chooser
    with pytest.raises(TypeError):
        Speed(chooser="choose_cpu_setting")     # a name is not a function
    with pytest.raises(TypeError):
        Speed(measure=True)                     # the old switch is gone: pass a chooser


def test_resolve_hands_the_choice_to_the_chooser_only_when_it_is_open(kept):
    asked = []

    def chooser(model, batch_size, image_size, *, amp, channels_last, cache):
        asked.append((type(model).__name__, batch_size, image_size, amp, channels_last, cache))
        return {"amp": torch.bfloat16, "channels_last": True,
                "choice": {"setting": "bf16 channels_last", "by": "measured"}}

    net = kd.models.build("lightnn", seed=0)
    got = Speed(chooser=chooser).resolve(net, CPU, 16, 24, cache="c.json")
    assert asked == [("LightNN", 16, 24, "auto", None, "c.json")]
    assert got == {"amp": torch.bfloat16, "channels_last": True, "keep_memory": False,
                   "choice": {"setting": "bf16 channels_last", "by": "measured"}}
    Speed(chooser=chooser, channels_last=False).resolve(net, CPU, 16)   # the precision is still open
    assert asked[-1][3:5] == ("auto", False) and len(asked) == 2
    # nothing left open, a reloaded run (measure=False), a GPU: the chooser is not asked
    fixed = Speed(chooser=chooser, channels_last=False, amp="off").resolve(net, CPU, 16)
    assert (fixed["amp"], fixed["channels_last"], fixed["choice"]) == (None, False, None)
    assert Speed(chooser=chooser).resolve(net, CPU, 16, measure=False)["choice"] is None
    gpu = Speed(chooser=chooser, amp="off").resolve(net, torch.device("cuda"), 16)
    assert gpu["channels_last"] is True and gpu["choice"] is None and len(asked) == 2
    # without a chooser a CPU run is fp32 NCHW
    plain = Speed().resolve(net, CPU, 16)
    assert (plain["amp"], plain["channels_last"], plain["choice"]) == (None, False, None)


def test_fit_on_the_cpu_uses_and_records_the_measured_choice(options, monkeypatch, kept):
    calls, layouts = [], []
    monkeypatch.setattr(ch, "step_rate", _fake_rates(
        {"fp32 NCHW": 100.0, "fp32 channels_last": 120.0, "bf16 NCHW": 10.0,
         "bf16 channels_last": 12.0}, calls))
    measured = Speed(chooser=ch.choose_cpu_setting)

    def step(model, x, y, t):
        layouts.append(x.is_contiguous(memory_format=torch.channels_last))
        return torch.nn.functional.cross_entropy(model(x), y)

    run = kd.train.fit(kd.models.build("lightnn", seed=0), _tiny(), Recipe(epochs=1, batch_size=16),
                       chapter="t", method="ce", step=step, speed=measured, options=options)
    assert all(layouts) and run.record["speed"]["channels_last"] is True
    assert run.record["speed"]["amp"] == "off" and run.record["speed"]["keep_memory"] is False
    choice = run.record["speed"]["choice"]
    assert choice["setting"] == "fp32 channels_last" and choice["by"] == "measured"
    assert choice["rates"]["fp32 NCHW"] == 100.0
    # a finished run is only reloaded: nothing is timed again
    n = len(calls)
    kd.train.fit(kd.models.build("lightnn", seed=0), _tiny(), Recipe(epochs=1, batch_size=16),
                 chapter="t", method="ce", step=step, speed=measured, options=options)
    assert len(calls) == n
    # explicit settings win: nothing is timed, nothing recorded as chosen
    fixed = kd.train.fit(kd.models.build("lightnn", seed=1), _tiny(), Recipe(epochs=1, batch_size=16, seed=1),
                         chapter="t", method="ce", options=options,
                         speed=Speed(channels_last=False, amp="off", chooser=ch.choose_cpu_setting))
    assert len(calls) == n and "choice" not in fixed.record["speed"]
    assert fixed.record["speed"]["channels_last"] is False
    # without a chooser (the default) nothing is timed: fp32 NCHW on the CPU, reproducible,
    # and freed memory is not kept
    plain = kd.train.fit(kd.models.build("lightnn", seed=2), _tiny(), Recipe(epochs=1, batch_size=16, seed=2),
                         chapter="t", method="ce", options=options)
    assert len(calls) == n and "choice" not in plain.record["speed"]
    assert plain.record["speed"] == {"channels_last": False, "amp": "off", "keep_memory": False,
                                     "compile": False}
    assert kept == []


def test_a_records_speed_entry_names_the_setting_it_ran_in():
    choice = {"setting": "bf16 channels_last", "by": "measured", "rates": {}, "seconds": 1.0}
    for dtype, cl, name in ((None, False, "fp32 NCHW"), (torch.bfloat16, True, "bf16 channels_last"),
                            (torch.float16, False, "fp16 NCHW")):
        entry = sp.speed_record({"amp": dtype, "channels_last": cl, "choice": None}, compile=False)
        assert entry == {"channels_last": cl, "amp": {None: "off", torch.bfloat16: "bfloat16",
                                                      torch.float16: "float16"}[dtype],
                         "keep_memory": False, "compile": False}
        assert sp.recorded_setting(json.loads(json.dumps(entry))) == name
    measured = sp.speed_record({"amp": torch.bfloat16, "channels_last": True, "choice": choice})
    assert measured["choice"] == choice and "compile" not in measured
    assert sp.recorded_setting(None) == "fp32 NCHW"   # records made before the entry existed


_PROBE = """
import ctypes, resource, sys, torch
from kdutils import speed
from kdutils.tools import chooser
ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)   # PR_SET_THP_DISABLE: count small pages on any kernel
if sys.argv[1] == "keep" and not (speed.keep_freed_memory() and speed.keep_freed_memory()):
    print("unsupported"); sys.exit()     # this C library refused the setting
def faults(reps):   # page faults per re-allocation of a freed 48 MB block
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(reps):
        t = torch.empty(48 * 2**20, dtype=torch.uint8); t.fill_(1); del t
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / (48 * 2**20 / resource.getpagesize())
faults(20)
print(faults(10), chooser.machine_id().endswith("freed memory kept"), speed.freed_memory_kept())
"""


@pytest.mark.skipif(not sp.has_glibc(), reason="freed memory is kept through glibc's malloc only")
def test_kept_freed_memory_is_reused_instead_of_faulted_in_again():
    root = str(Path(__file__).resolve().parents[1])
    env = {k: v for k, v in os.environ.items()   # glibc's own malloc, as configured by default
           if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))

    def probe(mode):   # a fresh process each: the setting is process-wide
        out = subprocess.run([sys.executable, "-c", _PROBE, mode], env=env, capture_output=True,
                             text=True, check=True).stdout.split()
        if out == ["unsupported"]:
            pytest.skip("this glibc refused the thresholds")
        return float(out[0]), out[1] == "True", out[2] == "True"
    returned, kept = probe("return"), probe("keep")
    assert returned[0] >= 9 and not returned[1] and not returned[2]   # every re-allocation faults its pages in
    assert kept[0] < 1 and kept[1] and kept[2]                        # kept: the same pages serve every step


def test_the_environment_variable_reads_as_a_switch(monkeypatch):
    for value, on in (("1", True), ("true", True), (" Yes ", True), ("on", True),
                      ("0", False), ("", False), ("no", False), ("2", False)):
        monkeypatch.setenv("KD_KEEP_MEMORY", value)
        assert settings.keep_memory_default() is on, value
    monkeypatch.delenv("KD_KEEP_MEMORY")
    assert settings.keep_memory_default() is False


def test_speed_keeps_freed_memory_only_when_asked(monkeypatch, kept):
    net = kd.models.build("lightnn", seed=0)
    assert Speed().keep_memory is None
    # by default nothing is kept: Speed() never calls keep_freed_memory
    assert Speed().resolve(net, CPU, 16)["keep_memory"] is False and kept == []
    monkeypatch.setenv("KD_KEEP_MEMORY", "0")
    assert Speed().resolve(net, CPU, 16)["keep_memory"] is False and kept == []
    assert Speed(keep_memory=False).resolve(net, CPU, 16)["keep_memory"] is False and kept == []
    # KD_KEEP_MEMORY=1 turns it on where the field is left at None; an explicit False wins
    monkeypatch.setenv("KD_KEEP_MEMORY", "1")
    assert Speed(keep_memory=False).resolve(net, CPU, 16)["keep_memory"] is False and kept == []
    assert Speed().resolve(net, CPU, 16)["keep_memory"] is True and kept == [1]
    # once the process keeps freed memory, a run that did not ask for it says so all the same
    assert Speed(keep_memory=False).resolve(net, CPU, 16)["keep_memory"] is True and kept == [1]
    # asked for explicitly, without the variable
    monkeypatch.delenv("KD_KEEP_MEMORY")
    assert Speed(keep_memory=True).resolve(net, CPU, 16)["keep_memory"] is True and kept == [1, 1]
    gpu = Speed(amp="off", keep_memory=True).resolve(net, torch.device("cuda"), 16)  # no GPU needed
    assert gpu["keep_memory"] is False and gpu["channels_last"] is True and kept == [1, 1]
    assert sp.speed_record(gpu)["keep_memory"] is False
