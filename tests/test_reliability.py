"""Runs survive SIGKILL, corrupted files and two processes wanting the same teacher."""
import json
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import kdutils as kd
from kdutils.checkpoint import CheckpointError

CHAPTERS = {"ce": "baseline", "kd": "hinton_kd", "byot": "self_distillation"}

WORKER = textwrap.dedent("""
    import json, sys, torch, kdutils as kd
    from kdutils import book
    from kdutils.data import ImageData
    from kdutils.settings import RunOptions
    method, ckpt, res, epochs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    chapter = %r.get(method)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    y = torch.arange(2500) %% 10
    x = torch.randint(0, 256, (2500, 3, 32, 32), dtype=torch.uint8, generator=g)
    x[:, 0] = (y * 25).to(torch.uint8).view(-1, 1, 1)
    data = ImageData(x[:2000], y[:2000], x[2000:], y[2000:], kd.data.CIFAR10_CLASSES, "synthetic")
    options = RunOptions(ckpt_dir=ckpt, results_dir=res, progress=False)
    if method == "teacher":
        run = book.teachers.get_teacher("lightnn", data, kd.train.Recipe(epochs=epochs, batch_size=50),
                                        options=options)
    elif method == "byot":  # multi-exit self-distillation with every source of state in play
        small = ImageData(x[:96], y[:96], x[2000:2100], y[2000:2100], kd.data.CIFAR10_CLASSES, "synthetic")
        recipe = kd.train.Recipe(epochs=epochs, batch_size=16, lr=0.05, optimizer="sgd",
                                 weight_decay=5e-4, schedule="onecycle", augment=True,
                                 autoaugment=True, erasing=0.5, seed=3)
        run = kd.train.fit(kd.models.build("resnet18_multiexit", seed=3), small, recipe,
                           chapter=chapter, method="byot", step=kd.methods.byot_step, options=options)
    else:
        teacher = book.teachers.get_teacher("lightnn", data, kd.train.Recipe(epochs=1, batch_size=50),
                                            options=options)
        runs = kd.methods.train_seeds(method, data, seeds=[3], recipe=kd.train.Recipe(epochs=epochs, batch_size=50),
                                      chapter=chapter, teacher=None if method == "ce" else teacher,
                                      options=options)
        run = runs[0]
    torch.save(run.model.state_dict(), ckpt + "/final.pt")
    print(json.dumps({"resumed_from": run.resumed_from_epoch, "acc": run.test_acc,
                      "exit_acc": run.record.get("exit_acc"), "history": run.record["history"]}))
""" % CHAPTERS)


def _start(tmp, name, method, epochs):
    d = tmp / name
    d.mkdir(exist_ok=True)
    cmd = [sys.executable, "-c", WORKER, method, str(d), str(d / "results"), str(epochs)]
    return d, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(stdout: str) -> dict:
    """The worker's result: its last line (a reloaded run says so on a line before it)."""
    return json.loads(stdout.strip().splitlines()[-1])


def _checkpoints(d, chapter):
    return sorted((d / chapter).glob("*.pt")) if (d / chapter).is_dir() else []


@pytest.mark.parametrize("method", ["ce", "kd", "byot"])
def test_sigkill_mid_epoch_then_restart_gives_the_uninterrupted_result(tmp_path, method):
    chapter = CHAPTERS[method]
    ref_dir, ref = _start(tmp_path, "ref", method, 4)
    ref_out, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err
    d, proc = _start(tmp_path, "killed", method, 4)
    deadline = time.time() + 240
    while time.time() < deadline:  # wait until epoch 1 is checkpointed, then kill inside epoch 2
        ckpts = _checkpoints(d, chapter)
        if ckpts:
            try:
                if kd.checkpoint.load_checkpoint(ckpts[0])["epoch"] >= 1:
                    break
            except (CheckpointError, OSError, KeyError):
                pass
        time.sleep(0.05)
    time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    epoch_at_kill = kd.checkpoint.load_checkpoint(_checkpoints(d, chapter)[0])["epoch"]
    assert 1 <= epoch_at_kill < 4, "the kill came too late to test anything"
    again = subprocess.run([sys.executable, "-c", WORKER, method, str(d), str(d / "results"), "4"],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert _result(again.stdout)["resumed_from"] == epoch_at_kill
    a = torch.load(ref_dir / "final.pt", weights_only=True)
    b = torch.load(d / "final.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    resumed, reference = _result(again.stdout), _result(ref_out)
    assert resumed["acc"] == reference["acc"] and resumed["exit_acc"] == reference["exit_acc"]
    drop = ("seconds",)  # everything but the wall time is identical, epoch by epoch
    assert ([{k: v for k, v in h.items() if k not in drop} for h in resumed["history"]]
            == [{k: v for k, v in h.items() if k not in drop} for h in reference["history"]])


def test_two_processes_wanting_the_same_teacher_train_it_once(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    cmd = [sys.executable, "-c", WORKER, "teacher", str(shared), str(shared / "results"), "3"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    resumed = sorted(_result(o[0])["resumed_from"] for o in outs)
    assert resumed == [0, 3]  # one trained all 3 epochs, the other only loaded the result
    assert sorted("finished run, reloaded" in o[0] for o in outs) == [False, True]  # and said so
    assert len(_checkpoints(shared, "teacher")) == 1


def test_corrupted_checkpoint_stops_the_run_and_is_left_untouched(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = kd.data.ImageData(torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=g),
                             torch.arange(40) % 10, torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8),
                             torch.arange(20) % 10, kd.data.CIFAR10_CLASSES, "synthetic")
    dirs = {"options": kd.settings.RunOptions(ckpt_dir=str(tmp_path / "c"), results_dir=str(tmp_path / "r"),
                                              progress=False)}
    recipe = kd.train.Recipe(epochs=2, batch_size=20)
    run = kd.train.fit(kd.models.build("lightnn", seed=0), data, recipe, chapter="t", method="ce", **dirs)
    damaged = run.checkpoint.read_bytes()[:500]
    run.checkpoint.write_bytes(damaged)
    with pytest.raises(CheckpointError, match=r"cannot load checkpoint .*\.pt: it is truncated"):
        kd.train.fit(kd.models.build("lightnn", seed=0), data, recipe, chapter="t", method="ce", **dirs)
    assert run.checkpoint.read_bytes() == damaged
