"""The code paths a GPU takes (autocast, gradient scaling, channels_last, torch.compile),
run on the CPU with tiny models, and the device-specific choices as plain functions."""
import shutil

import pytest
import torch

import kdutils as kd
from kdutils.checkpoint import load_checkpoint
from kdutils.data import ImageData
from kdutils.settings import RunOptions
from kdutils.speed import Speed, choose_layout, choose_precision, cuda_native_bf16
from kdutils.train import Recipe


def _tiny(n_train=64, n_test=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n_train + n_test) % 10
    x = torch.randint(0, 256, (n_train + n_test, 3, 32, 32), dtype=torch.uint8, generator=g)
    x[:, 0] = (y * 25).to(torch.uint8).view(-1, 1, 1)
    return ImageData(x[:n_train], y[:n_train], x[n_train:], y[n_train:], kd.data.CIFAR10_CLASSES,
                     "synthetic")


@pytest.fixture
def dirs(tmp_path):
    return {"options": RunOptions(ckpt_dir=str(tmp_path / "ck"), results_dir=str(tmp_path / "res"),
                                  progress=False)}


class _InfGrad(torch.autograd.Function):
    """Identity forward, infinite gradient backward: an overflow the loss value does not show."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


class _Interrupt(Exception):
    pass


# ---- the choices, as functions of the device's properties ------------------------------------

@pytest.mark.parametrize("gpu, capability, dtype", [
    ("T4", (7, 5), torch.float16), ("V100", (7, 0), torch.float16),
    ("A100", (8, 0), torch.bfloat16), ("L4", (8, 9), torch.bfloat16), ("H100", (9, 0), torch.bfloat16)])
def test_auto_precision_is_bf16_on_ampere_and_later_and_fp16_before(gpu, capability, dtype):
    assert choose_precision("auto", "cuda", cuda_native_bf16(capability)) is dtype, gpu


def test_explicit_precision_wins_and_auto_is_off_outside_cuda():
    assert choose_precision("auto", "cpu", True) is None
    assert choose_precision("auto", "mps", False) is None
    assert choose_precision("bf16", "cuda", False) is torch.bfloat16
    assert choose_precision("fp16", "cuda", True) is torch.float16
    assert choose_precision("off", "cuda", True) is None
    assert choose_precision("bf16", "cpu", False) is torch.bfloat16
    with pytest.raises(ValueError, match="amp must be"):
        choose_precision("fp8", "cuda", True)
    assert choose_layout(None, "cuda") and not choose_layout(None, "cpu")
    assert choose_layout(True, "cpu") and not choose_layout(False, "cuda")


# ---- the branches themselves, on the CPU --------------------------------------------------------

def test_bf16_autocast_runs_the_step_in_bf16_and_keeps_fp32_weights(dirs):
    seen = []

    def step(model, x, y, t):
        out = model(x)
        seen.append(out.dtype)
        return torch.nn.functional.cross_entropy(out, y)

    run = kd.train.fit(kd.models.build("lightnn", seed=0), _tiny(), Recipe(epochs=1, batch_size=16),
                       chapter="t", method="ce", step=step, speed=Speed(amp="bf16"), **dirs)
    assert set(seen) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in run.model.parameters())
    assert run.record["speed"]["amp"] == "bfloat16"  # the dtype the run used
    assert 0 <= run.test_acc <= 100


def test_fp16_gradient_scaler_skips_an_overflowing_step_and_backs_off(dirs):
    calls = {"n": 0}
    before = {}

    def step(model, x, y, t):
        calls["n"] += 1
        loss = torch.nn.functional.cross_entropy(model(x), y)
        if calls["n"] == 2:
            before.update({k: v.clone() for k, v in model.state_dict().items()})
            return _InfGrad.apply(loss)
        if calls["n"] == 3:  # the overflowing step changed no weight
            for k, v in model.state_dict().items():
                assert torch.equal(v, before[k]), k
        return loss

    run = kd.train.fit(kd.models.build("lightnn", seed=0), _tiny(), Recipe(epochs=1, batch_size=16),
                       chapter="t", method="ce", step=step, speed=Speed(amp="fp16"), **dirs)
    assert calls["n"] == 4
    assert all(torch.isfinite(p).all() for p in run.model.parameters())
    scaler = load_checkpoint(run.checkpoint)["scaler"]
    assert scaler["scale"] == 2.0 ** 16 * 0.5  # the initial scale, halved once


def test_fp16_run_resumes_with_its_scaler_state(dirs, tmp_path):
    data = _tiny()
    recipe = Recipe(epochs=2, batch_size=16, seed=1)
    calls = {"n": 0}

    def step(model, x, y, t, interrupt=False):
        calls["n"] += 1
        loss = torch.nn.functional.cross_entropy(model(x), y)
        if calls["n"] == 2:
            return _InfGrad.apply(loss)      # epoch 1 halves the scale
        if interrupt and calls["n"] == 6:    # epoch 2, second batch
            raise _Interrupt
        return loss

    kw = dict(chapter="t", method="ce", speed=Speed(amp="fp16"))
    whole = kd.train.fit(kd.models.build("lightnn", seed=1), data, recipe, step=step,
                         options=RunOptions(ckpt_dir=str(tmp_path / "a"), results_dir=str(tmp_path / "ra"),
                                            progress=False), **kw)
    calls["n"] = 0
    b = dict(options=RunOptions(ckpt_dir=str(tmp_path / "b"), results_dir=str(tmp_path / "rb"),
                                progress=False))
    with pytest.raises(_Interrupt):
        kd.train.fit(kd.models.build("lightnn", seed=1), data, recipe,
                     step=kd.fingerprint.watching(step)(lambda *a: step(*a, interrupt=True)), **b, **kw)
    calls["n"] = 100  # no more overflow: the resumed epoch must get its scale from the checkpoint
    resumed = kd.train.fit(kd.models.build("lightnn", seed=1), data, recipe, step=step, **b, **kw)
    assert resumed.resumed_from_epoch == 1
    assert load_checkpoint(resumed.checkpoint)["scaler"]["scale"] == \
        load_checkpoint(whole.checkpoint)["scaler"]["scale"] == 2.0 ** 15
    for k, v in whole.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k


def test_channels_last_reaches_the_weights_and_the_batches(dirs):
    layouts = []

    def step(model, x, y, t):
        layouts.append(x.is_contiguous(memory_format=torch.channels_last))
        return torch.nn.functional.cross_entropy(model(x), y)

    run = kd.train.fit(kd.models.build("lightnn", seed=0), _tiny(), Recipe(epochs=1, batch_size=16),
                       chapter="t", method="ce", step=step, speed=Speed(channels_last=True), **dirs)
    assert layouts and all(layouts)
    conv = next(m for m in run.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert run.record["speed"]["channels_last"] is True


@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None,
                    reason="torch.compile's CPU backend needs a C compiler (gcc), not found here")
def test_compiled_student_trains_through_the_compiled_graph(dirs, tmp_path, monkeypatch):
    torch._dynamo.reset()
    from torch._dynamo.utils import counters
    from torch._inductor import config
    counters.clear()
    # A compile cache of its own: inductor's cache keys leave out ATEN_CPU_CAPABILITY, so a graph
    # compiled by a run of the suite with the CPU's own capability (AVX512) would be reused by
    # a run with a forced lower one (avx2) and read out of bounds.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    # With ATEN_CPU_CAPABILITY=default (ATen's scalar kernels forced, a check this suite is run
    # with) inductor still writes vector code for the CPU it sees, against headers built
    # without it, and g++ fails; scalar generated code (simdlen 1) keeps the compiled path.
    scalar = torch.backends.cpu.get_cpu_capability() == "DEFAULT"
    with config.patch({"cpp.simdlen": 1} if scalar else {}):
        run = kd.train.fit(kd.models.build("lightnn", seed=0), _tiny(), Recipe(epochs=1, batch_size=32),
                           chapter="t", method="ce", speed=Speed(compile=True), **dirs)
    assert counters["stats"]["unique_graphs"] >= 1
    assert run.record["speed"]["compile"] is True
    assert 0 <= run.test_acc <= 100
    torch._dynamo.reset()
