"""Scale-out: the same loop under torchrun, 2 CPU processes with gloo, against 1 process.

The figures of the appendix come from this file's runs (``pytest -s`` prints them).
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

import kdutils as kd
from kdutils import book
import kdutils.book.cli  # noqa: F401  (a command: not imported by kdutils.book itself)

WORKER = textwrap.dedent("""
    import json, sys, time, torch, kdutils as kd
    from kdutils.data import ImageData, TensorLoader
    out, epochs = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(1)
    w = kd.dist.setup("cpu")
    g = torch.Generator().manual_seed(0)
    y = torch.arange(400) % 10
    x = torch.randint(0, 256, (400, 3, 32, 32), dtype=torch.uint8, generator=g)
    x[:, 0] = (y * 25).to(torch.uint8).view(-1, 1, 1)
    data = ImageData(x[:320], y[:320], x[320:], y[320:], kd.data.CIFAR10_CLASSES, "synthetic")
    seen = []
    plain_iter = TensorLoader.__iter__
    def logged(self):  # which training images this process received in epoch 1
        for b in plain_iter(self):
            if self.shuffle and self.epoch == 0:
                seen.extend(b[2].tolist())
            yield b
    TensorLoader.__iter__ = logged
    model = kd.models.build("lightnn", seed=1)
    model.classifier[2].p = 0.0  # no dropout: its masks cannot coincide between 1 and 2 processes
    t0 = time.perf_counter()
    options = kd.settings.RunOptions(device="cpu", ckpt_dir=out + "/ck", results_dir=out + "/res",
                                     progress=False)
    run = kd.train.fit(model, data, kd.train.Recipe(epochs=epochs, batch_size=32, augment=True, seed=4),
                       chapter="t", method="ce", options=options)
    json.dump({"rank": w.rank, "world": w.size, "seen": seen, "history": run.record["history"],
               "resumed_from": run.resumed_from_epoch, "seconds": time.perf_counter() - t0,
               "weights": {k: v.tolist() for k, v in run.model.state_dict().items()}},
              open(f"{out}/rank{w.rank}.json", "w"))
    kd.dist.teardown()
""")


def _torchrun(n, *args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *args]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    path = tmp_path_factory.mktemp("dist") / "worker.py"
    path.write_text(WORKER)
    return path


def _kill_all_with(marker: str) -> None:
    """SIGKILL every process whose command line mentions ``marker``."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline and int(pid) != os.getpid():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


def _run(cmd, cwd):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env(), cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_two_processes_match_one_with_the_same_global_batch(worker, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    _run([sys.executable, str(worker), str(one), "3"], tmp_path)
    _run(_torchrun(2, str(worker), str(two), "3"), tmp_path)
    single = json.loads((one / "rank0.json").read_text())
    ranks = [json.loads((two / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]  # both ranks finished
    # each rank saw a disjoint half of every epoch; together exactly the single process's images
    s0, s1 = set(ranks[0]["seen"]), set(ranks[1]["seen"])
    assert not s0 & s1 and len(s0) == len(s1) == 160
    assert sorted(s0 | s1) == sorted(single["seen"])
    # one run record, written by rank 0, that says how many processes made it
    records = list((two / "res").rglob("*.json"))
    assert len(records) == 1 and json.loads(records[0].read_text())["processes"] == 2
    # the same trajectory: averaged gradients over 2 x 16 images = the gradient over 32
    for a, b in zip(single["history"], ranks[0]["history"]):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
        assert abs(b["test_acc"] - a["test_acc"]) <= 100 / 80  # at most one test image apart
    diff = max(np.abs(np.array(single["weights"][k]) - np.array(ranks[0]["weights"][k])).max()
               for k in single["weights"])
    assert diff < 1e-3
    assert ranks[0]["weights"] == ranks[1]["weights"]  # the replicas never drift apart
    print(f"\n1 process: {single['seconds']:.2f} s for 3 epochs; 2 processes: "
          f"{ranks[0]['seconds']:.2f} s; max weight difference {diff:.2e}; final loss "
          f"{single['history'][-1]['train_loss']:.6f} vs {ranks[0]['history'][-1]['train_loss']:.6f}")


def test_killed_distributed_run_resumes_to_the_uninterrupted_result(worker, tmp_path):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    ref.mkdir(), killed.mkdir()
    _run(_torchrun(2, str(worker), str(ref), "4"), tmp_path)
    proc = subprocess.Popen(_torchrun(2, str(worker), str(killed), "4"), env=_env(), cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    epoch = 0
    while time.time() < deadline and epoch < 1:
        for ck in (killed / "ck" / "t").glob("*.pt") if (killed / "ck" / "t").is_dir() else []:
            try:
                epoch = kd.checkpoint.load_checkpoint(ck)["epoch"]
            except Exception:
                pass
        time.sleep(0.05)
    _kill_all_with(str(killed))  # torchrun and both workers (each in its own session)
    proc.wait()
    ck = next((killed / "ck" / "t").glob("*.pt"))
    at_kill = kd.checkpoint.load_checkpoint(ck)["epoch"]
    assert 1 <= at_kill < 4, "the kill came too late to test anything"
    _run(_torchrun(2, str(worker), str(killed), "4"), tmp_path)
    a = json.loads((ref / "rank0.json").read_text())
    b = [json.loads((killed / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["resumed_from"] for r in b] == [at_kill, at_kill]
    assert b[0]["weights"] == a["weights"]  # bitwise: same processes, same reduction order
    assert [h["train_loss"] for h in b[0]["history"]] == [h["train_loss"] for h in a["history"]]


def test_recipe_command_line_runs_a_chapter_under_torchrun(tmp_path):
    env_dirs = ["--ckpt_dir", str(tmp_path / "ck"), "--results_dir", str(tmp_path / "res")]
    proc = subprocess.run(_torchrun(2, "-m", "kdutils.book", "baseline", "--profile", "smoke",
                                    "--seeds", "0", "--progress", "False", *env_dirs),
                          capture_output=True, text=True, timeout=600, env=_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "baseline: profile=smoke" in proc.stdout and "2 process(es)" in proc.stdout
    assert proc.stdout.count("baseline: profile=smoke") == 1  # only rank 0 prints
    records = [json.loads(p.read_text()) for p in (tmp_path / "res").rglob("*.json")]
    assert sorted(r["method"] for r in records) == ["ce", "deepnn"]  # teacher + one student, once each
    assert all(r["processes"] == 2 for r in records)


def test_recipe_command_line_checks_parameters_before_starting(monkeypatch):
    monkeypatch.delenv("KD_PROFILE", raising=False)
    proc = subprocess.run([sys.executable, "-m", "kdutils.book", "hinton_kd", "--alpha", "1.5"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "parameter 'alpha' = 1.5 is not allowed: it must be a number in [0, 1]" in proc.stderr
    name, P = book.cli.parse(["resnet50_to_resnet18", "--profile", "cpu", "--seeds", "3", "4", "--T", "2"])
    assert name == "resnet50_to_resnet18" and P.seeds == [3, 4] and P.T == 2.0 and P.epochs == 3
    proc = subprocess.run([sys.executable, "-m", "kdutils.book", "hinton"],   # the old name
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "invalid choice: 'hinton'" in proc.stderr


def test_shard_rejects_a_batch_that_does_not_split_evenly():
    loader = kd.data.TensorLoader(torch.zeros(10, 3, 4, 4, dtype=torch.uint8), torch.zeros(10, dtype=torch.long),
                                  5, shuffle=True)
    with pytest.raises(ValueError, match="batch_size 5 must be a multiple of the number of processes"):
        loader.shard(0, 2)
