"""A run's code fingerprint: a changed loss trains again, a changed comment reloads."""
import functools
import importlib
import linecache
import sys
import textwrap

import pytest
import torch

import kdutils as kd
from kdutils import book
from kdutils.checkpoint import atomic_save, load_checkpoint
from kdutils.data import ImageData
from kdutils.fingerprint import changed, code_fingerprint
from kdutils.settings import RunOptions
from kdutils.train import Recipe, fit

STEP = '''
import torch.nn.functional as F
from torch import nn

SMOOTHING = {smoothing}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 32 * 32, 10)

    def forward(self, x):
        return self.fc(x.flatten(1) / 255) * {scale}


def step(model, x, y, t):
    """{doc}"""
    {comment}
    return F.cross_entropy(model(x), y, label_smoothing=SMOOTHING)
'''


@pytest.fixture
def module(tmp_path, monkeypatch):
    """Write the loss module with the given text and (re)import it under one name, as an
    edited file is imported again by a restarted notebook."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    name = f"kd_fp_steps_{tmp_path.name}"
    path = tmp_path / f"{name}.py"

    def write(smoothing=0.0, scale=1.0, doc="The loss.", comment="# cross-entropy"):
        path.write_text(textwrap.dedent(STEP.format(smoothing=smoothing, scale=scale, doc=doc,
                                                    comment=comment)))
        linecache.clearcache()   # a rewrite of the same size within one clock tick looks unchanged
        importlib.invalidate_caches()
        sys.modules.pop(name, None)
        return importlib.import_module(name)
    yield write
    sys.modules.pop(name, None)



def test_a_fingerprint_follows_the_code_a_step_calls_and_ignores_comments_and_docstrings(module, tmp_path):
    m = module()
    fp = code_fingerprint(m.step, m.Net(), kd.models.build("lightnn", seed=0))
    assert {f"{m.__name__}.step", f"{m.__name__}.SMOOTHING", f"{m.__name__}.Net"} <= fp.keys()
    assert "kdutils.models.LightNN" in fp       # the classes of the models given
    assert not [n for n in fp if n.startswith(("torch", "torchvision"))]  # libraries: by version
    base = code_fingerprint(m.step, m.Net())    # (read now: the source is read from the file)
    assert code_fingerprint((r := module(doc="Reworded.\n\n    At length.", comment="")).step,
                            r.Net()) == base
    assert changed(base, code_fingerprint((e := module(smoothing=0.1)).step, e.Net())) == \
        [f"{m.__name__}.SMOOTHING"]              # a constant the loss names, by value
    assert changed(base, code_fingerprint((e := module(scale=2.0)).step, e.Net())) == \
        [f"{m.__name__}.Net"]                    # a method of the model's class
    assert changed(None, base) == []            # a checkpoint made before fingerprints existed
    # partials, library decorators and watching wrappers are the function they wrap;
    # any other wrapper of the book's code is code of its own
    kd_fp = code_fingerprint(kd.methods.kd_step)
    assert code_fingerprint(functools.partial(kd.methods.kd_step, T=2.0)) == kd_fp
    assert code_fingerprint(torch.no_grad()(kd.methods.kd_step)) == kd_fp
    assert code_fingerprint(kd.fingerprint.watching(kd.methods.kd_step)(lambda *a: None)) == kd_fp
    assert code_fingerprint(functools.wraps(kd.methods.kd_step)(lambda *a: None)) != kd_fp
    # a notebook's own step, calling the book's loss through the package
    namespace = {"kd": kd, "__name__": "__main__"}   # as in a notebook
    cell = "def step(model, x, y, t):\n    return kd.losses.kd_loss(model(x), t, y)\n"
    (tmp_path / "cell.py").write_text(cell)
    exec(compile(cell, str(tmp_path / "cell.py"), "exec"), namespace)
    assert {"__main__.step", "kdutils.losses.kd_loss"} <= code_fingerprint(namespace["step"]).keys()


def test_a_file_edited_after_import_is_an_error_not_another_functions_hash(module, tmp_path):
    """The source is read from the file when the fingerprint is taken: lines inserted above a
    function after it was imported put another text where it was. That must not pass for the
    function's code (it did, and a finished teacher was trained again over its checkpoint)."""
    m = module()
    assert f"{m.__name__}.step" in code_fingerprint(m.step)
    path = tmp_path / f"{m.__name__}.py"
    path.write_text("# a comment\n# another\n\n\n\n\n\n" + path.read_text())   # not imported again
    linecache.clearcache()
    with pytest.raises(RuntimeError, match=f"{m.__name__}.py changed since this process imported it"):
        code_fingerprint(m.step)


def test_a_run_whose_loss_changed_trains_again_and_one_whose_comments_changed_reloads(
        module, tiny, tmp_path, capsys):
    dirs = {"options": RunOptions(ckpt_dir=str(tmp_path / "ckpt"), results_dir=str(tmp_path / "results"),
                                  progress=False)}

    def train(m):
        return fit(kd.models.build("lightnn", seed=0), tiny, Recipe(epochs=2, batch_size=32),
                   step=m.step, chapter="baseline", method="ce", **dirs)
    first = train(module())
    assert first.resumed_from_epoch == 0 and first.record["code"] == kd.runs.run_code(
        kd.models.build("lightnn", seed=0), module().step)
    capsys.readouterr()

    reworded = train(module(doc="Cross-entropy with the labels.", comment="# reworded"))
    assert reworded.resumed_from_epoch == 2 and reworded.record == first.record
    assert "other code" not in capsys.readouterr().out

    code = kd.runs.run_code(kd.models.build("lightnn", seed=0), module(smoothing=0.3).step)
    assert kd.runs.is_finished(first.checkpoint, 2) and not kd.runs.is_finished(first.checkpoint, 2, code)
    smoothed = train(module(smoothing=0.3))
    out = capsys.readouterr().out
    assert f"{module().__name__}.SMOOTHING changed since" in out and "training again" in out
    assert smoothed.resumed_from_epoch == 0 and smoothed.checkpoint == first.checkpoint
    assert smoothed.record["run_key"] == first.record["run_key"]   # same key, new training
    assert smoothed.record["code"] != first.record["code"]
    assert [h["train_loss"] for h in smoothed.record["history"]] != \
        [h["train_loss"] for h in first.record["history"]]
    assert load_checkpoint(first.checkpoint)["code"] == smoothed.record["code"]

    # a checkpoint written before fingerprints existed is reloaded as it is
    state = load_checkpoint(first.checkpoint)
    del state["code"]
    atomic_save(state, first.checkpoint)
    legacy = train(module())
    assert legacy.resumed_from_epoch == 2 and "other code" not in capsys.readouterr().out


def test_an_edited_teacher_recipe_code_trains_the_strong_teacher_again(tmp_path, monkeypatch, capsys):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(120) % 10
    x = torch.randint(0, 256, (120, 3, 32, 32), dtype=torch.uint8, generator=g)
    data = ImageData(x[:80], y[:80], x[80:], y[80:], kd.data.CIFAR10_CLASSES, "synthetic")
    options = RunOptions(profile="t", ckpt_dir=str(tmp_path / "c"), results_dir=str(tmp_path / "r"),
                         progress=False)
    r = book.airbench.AirbenchRecipe(epochs=1, batch_size=40, seed=0)
    first = book.airbench.train_airbench(data, r, options=options)
    assert "kdutils.book.airbench._airbench_epoch" in first.record["code"]
    assert book.airbench.train_airbench(data, r, options=options).resumed_from_epoch == 1
    real = book.airbench.lr_factor
    monkeypatch.setattr(book.airbench, "lr_factor", lambda step, total: 0.5 * real(step, total))
    again = book.airbench.train_airbench(data, r, options=options)
    assert again.resumed_from_epoch == 0 and "other code" in capsys.readouterr().out
