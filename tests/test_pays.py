"""The strong teacher (kdutils.book.airbench) and the regimes of chapter 6 (kdutils.book.regimes)."""
import json
from dataclasses import replace

import pandas as pd
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kdutils as kd
from kdutils import book
from kdutils.book import airbench, regimes
from kdutils.data import ImageData
from kdutils.loop import Teacher
from kdutils.settings import RunOptions


def _tiny(n_train=96, n_test=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n_train + n_test) % 10
    x = torch.randint(0, 256, (n_train + n_test, 3, 32, 32), dtype=torch.uint8, generator=g)
    x[:, 0] = (y * 25).to(torch.uint8).view(-1, 1, 1)  # a learnable signal
    return ImageData(x[:n_train], y[:n_train], x[n_train:], y[n_train:], kd.data.CIFAR10_CLASSES,
                     "synthetic")


@pytest.fixture
def dirs(tmp_path):
    return {"options": RunOptions(profile="t", ckpt_dir=str(tmp_path / "ck"),
                                  results_dir=str(tmp_path / "res"), progress=False)}


# ---- the airbench network and recipe --------------------------------------------------------

def test_whitening_layer_decorrelates_patches_to_unit_variance():
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(3, 3, generator=g)
    x = torch.einsum("dc,nchw->ndhw", mix, torch.randn(400, 3, 16, 16, generator=g))
    x = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), 3, stride=1)  # correlated neighbours
    w = airbench.whitening_weights(x, eps=0.0)
    assert w.shape == (24, 3, 2, 2)
    assert torch.allclose(w[12:], -w[:12])
    out = F.conv2d(x, w[:12]).permute(1, 0, 2, 3).reshape(12, -1)
    cov = out @ out.T / out.shape[1]
    assert torch.allclose(cov, torch.eye(12), atol=2e-3)


def test_network_freezes_the_whitening_weights_and_the_batchnorm_scales():
    net = airbench.AirbenchNet()
    frozen = {n for n, p in net.named_parameters() if not p.requires_grad}
    assert "whiten.weight" in frozen
    assert {n for n in frozen if "norm" in n} == {n for n, _ in net.named_parameters()
                                                   if "norm" in n and n.endswith("weight")}
    assert kd.models.count_params(net) == 1_972_792
    logits, h = net(torch.randn(2, 3, 32, 32), return_features=True)
    assert logits.shape == (2, 10) and h.shape == (2, 256)
    assert torch.allclose(logits, net.head(h) / 9)


def test_learning_rate_warms_up_over_23_percent_then_decays_to_7_percent():
    total = 100
    f = [airbench.lr_factor(s, total) for s in range(total + 1)]
    assert f[0] == pytest.approx(0.2) and f[23] == pytest.approx(1.0)
    assert f[total] == pytest.approx(0.07)
    assert all(a < b for a, b in zip(f[:23], f[1:24])) and all(a > b for a, b in zip(f[23:], f[24:]))


def test_optimizer_gives_batchnorm_biases_64_times_the_rate_and_skips_frozen_weights():
    net = airbench.AirbenchNet()
    r = airbench.AirbenchRecipe()
    opt = airbench._optimizer(net, r)
    biases, others = opt.param_groups
    assert biases["lr"] == pytest.approx(64 * others["lr"])
    assert others["lr"] == pytest.approx(11.5 / (1024 * (1 + 1 / 0.15)))
    # weight decay per 1,024 examples, decoupled: lr * wd is the same in both groups
    assert biases["lr"] * biases["weight_decay"] == pytest.approx(others["lr"] * others["weight_decay"])
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(net.whiten.weight) not in ids and id(net.whiten.bias) in ids
    assert opt.defaults["nesterov"] is True


def test_batches_flip_the_whole_set_every_other_epoch_and_follow_seed_and_epoch():
    data = _tiny()
    b = airbench.AirbenchBatches(data, 32, seed=3, translate=0, device=torch.device("cpu"))

    def by_index(epoch):
        out = torch.empty_like(b.x)
        for x, _, idx in b.epoch(epoch):
            out[idx] = x
        return out
    e0, e1 = by_index(0), by_index(1)
    assert torch.equal(e1, e0.flip(-1)) and torch.equal(by_index(2), e0)
    first = [idx for _, _, idx in b.epoch(5)]
    assert all(torch.equal(a, c) for a, c in zip(first, [idx for _, _, idx in b.epoch(5)]))
    assert not torch.equal(first[0], next(iter(b.epoch(6)))[2])
    shifted = airbench.AirbenchBatches(data, 32, seed=3, translate=2, device=torch.device("cpu"))
    x, _, idx = next(iter(shifted.epoch(0)))
    # a translated image equals the un-translated one moved by at most 2 pixels
    padded = F.pad(b.x[idx], (2, 2, 2, 2), mode="reflect")
    for i in range(4):
        assert any(torch.equal(x[i], padded[i, :, dy:dy + 32, dx:dx + 32])
                   for dy in range(5) for dx in range(5))


def test_test_time_augmentation_averages_mirror_and_shifted_views():
    net = airbench.AirbenchNet().eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(airbench.predict_tta(net, x, 0), net(x))
        mirror = 0.5 * (net(x) + net(x.flip(-1)))
        assert torch.allclose(airbench.predict_tta(net, x, 1), mirror, atol=1e-6)
        p = F.pad(x, (1, 1, 1, 1), mode="reflect")
        views = [p[..., :32, :32], p[..., 2:, 2:]]
        shifted = sum(0.5 * (net(v) + net(v.flip(-1))) for v in views) / 2
        assert torch.allclose(airbench.predict_tta(net, x, 2), 0.5 * mirror + 0.5 * shifted, atol=1e-6)


def test_teacher_is_evaluated_in_the_precision_it_trained_in():
    class Probe(torch.nn.Module):
        """Predicts class 0 from channel 0 and notes the autocast state of every forward."""
        def __init__(self):
            super().__init__()
            self.seen = []

        def forward(self, x):
            self.seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
            return F.one_hot(torch.zeros(len(x), dtype=torch.long), 10).float() + 0 * x[:, :1, 0, 0]

    data = _tiny(10, 40)
    for amp, tta, expected in ((None, 0, None), (torch.bfloat16, 0, torch.bfloat16),
                               (torch.bfloat16, 2, torch.bfloat16)):
        net = Probe()
        acc = airbench.accuracy(net, data, "cpu", tta_level=tta, batch_size=16, amp=amp)
        assert acc == 100.0 * (data.test_y == 0).sum().item() / 40   # 4 of the 40 test images
        assert net.seen == [expected] * (3 if tta == 0 else 18)     # 3 batches, 6 views each at level 2


def test_strong_teacher_learns_resumes_bitwise_and_is_then_only_loaded(dirs, monkeypatch, capsys):
    data = _tiny(160, 40)
    r = airbench.AirbenchRecipe(epochs=3, batch_size=32, seed=1)
    whole = airbench.train_airbench(data, r, **dirs)
    assert whole.record["method"] == "airbench" and whole.record["steps"] == 15
    assert whole.record["test_acc"] > 30  # the synthetic signal is learnable
    # a second run, interrupted after its first epoch, then resumed
    o = dirs["options"]
    other = {"options": replace(o, ckpt_dir=o.ckpt_dir + "2", results_dir=o.results_dir + "2")}
    calls = {"n": 0}
    real = airbench.accuracy

    @kd.fingerprint.watching(real)   # the same evaluation: the run's code fingerprint is unchanged
    def stop_after_first_epoch(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(airbench, "accuracy", stop_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        airbench.train_airbench(data, r, **other)
    monkeypatch.setattr(airbench, "accuracy", real)
    resumed = airbench.train_airbench(data, r, **other)
    assert resumed.resumed_from_epoch == 1
    for a, b in zip(whole.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    again = airbench.get_strong_teacher(data, r, **dirs)
    assert again.resumed_from_epoch == 3
    assert again.record == json.loads(json.dumps(whole.record))  # the record as written
    assert not any(p.requires_grad for p in again.model.parameters())
    # a record of this teacher left by another training (here the resumed one's: its seconds
    # differ) does not describe these weights: it is rewritten from the checkpoint
    foreign = json.loads(resumed.record_path.read_text())
    assert [h["seconds"] for h in foreign["history"]] != [h["seconds"] for h in whole.record["history"]]
    again.record_path.write_text(json.dumps(foreign))
    capsys.readouterr()
    reloaded = airbench.get_strong_teacher(data, r, **dirs)
    assert "described another training" in capsys.readouterr().out
    assert reloaded.record["history"] == json.loads(json.dumps(whole.record))["history"]
    assert json.loads(again.record_path.read_text())["history"] == reloaded.record["history"]


def test_too_few_images_for_one_batch_is_refused(dirs):
    with pytest.raises(ValueError, match="fewer than one batch"):
        airbench.train_airbench(_tiny(50), airbench.AirbenchRecipe(epochs=1), **dirs)


# ---- few labels ------------------------------------------------------------------------------

def test_label_subset_is_class_balanced_seeded_and_differs_between_seeds():
    y = torch.arange(1000) % 10
    a, b = regimes.label_subset(y, 0.05, seed=0), regimes.label_subset(y, 0.05, seed=0)
    assert torch.equal(a, b) and len(a) == 50
    assert torch.bincount(y[a], minlength=10).tolist() == [5] * 10
    assert not torch.equal(a, regimes.label_subset(y, 0.05, seed=1))
    assert torch.equal(regimes.label_subset(y, 1.0, seed=3), torch.arange(1000))
    assert len(regimes.label_subset(y, 0.001, seed=0)) == 10  # at least one per class
    with pytest.raises(ValueError, match="fraction must be in"):
        regimes.label_subset(y, 0.0, seed=0)


def test_repeat_to_fills_a_set_of_the_requested_size_with_the_chosen_images():
    data = _tiny(100)
    idx = torch.tensor([3, 7, 11])
    rep, rows = regimes.repeat_to(data, idx, 100)
    assert len(rep.train_y) == 100 and torch.equal(rows[:6], torch.tensor([3, 7, 11, 3, 7, 11]))
    assert torch.equal(rep.train_x, data.train_x[rows]) and torch.equal(rep.test_x, data.test_x)
    assert torch.bincount(rows, minlength=12)[[3, 7, 11]].tolist() == [34, 33, 33]


def test_unlabelled_step_is_hinton_kd_with_labels_only_where_they_exist_each_image_weighed_alike():
    torch.manual_seed(0)
    net = torch.nn.Linear(5, 10)
    x, y, t = torch.randn(8, 5), torch.randint(0, 10, (8,)), torch.randn(8, 10)
    every = torch.ones(8, dtype=torch.bool)
    step = kd.methods.kd_unlabelled_step
    full = step(net, x, y, {"logits": t, "labelled": every}, T=3.0, alpha=0.4)
    assert list(full) == ["kd", "ce"]
    assert kd.losses.total(full).item() == pytest.approx(
        kd.losses.kd_loss(net(x), t, y, T=3.0, alpha=0.4).item(), rel=1e-6)
    some = every.clone()
    some[::2] = False
    s = net(x)
    got = step(net, x, y, {"logits": t, "labelled": some}, T=3.0, alpha=0.4)
    assert got["kd"].item() == pytest.approx(0.4 * kd.losses.soft_target_loss(s, t, 3.0).item(), rel=1e-6)
    # every image weighs 1/8 of the batch, labelled or not: the labelled images' cross-entropy
    # is summed and divided by the batch, not averaged over the labelled ones (4 here), which
    # weighed each label 8/4 times a soft target, and 100 times at 1% labels
    per_image = F.cross_entropy(s, y, reduction="none")
    assert got["ce"].item() == pytest.approx(0.6 * per_image[some].sum().item() / 8, rel=1e-6)
    assert got["ce"].item() == pytest.approx(0.5 * 0.6 * F.cross_entropy(s[some], y[some]).item(), rel=1e-6)
    none = step(net, x, y, {"logits": t, "labelled": ~every}, T=3.0, alpha=0.4)
    assert none["ce"].item() == 0.0
    assert kd.losses.total(none).item() == pytest.approx(0.4 * kd.losses.soft_target_loss(s, t, 3.0).item(), rel=1e-6)
    # the labels of unlabelled images do not matter
    y2 = y.clone()
    y2[~some] = (y2[~some] + 1) % 10
    again = step(net, x, y2, {"logits": t, "labelled": some}, T=3.0, alpha=0.4)
    assert kd.losses.total(again).item() == kd.losses.total(got).item()


def test_few_label_runs_train_every_arm_with_the_same_steps_and_record_the_fraction(dirs):
    data = _tiny(100)
    teacher = book.teachers.get_teacher("lightnn", data, kd.train.Recipe(epochs=1, batch_size=50),
                                      **dirs)
    runs = regimes.few_label_runs(data, teacher, fractions=[0.2, 1.0], seeds=[0], epochs=1,
                                  batch_size=20, **dirs)
    got = [(r.record["method"], r.record["params"]["fraction"], r.record["params"]["labelled"])
           for r in runs]
    assert got == [("ce", 0.2, 20), ("kd", 0.2, 20), ("kd_unlabelled", 0.2, 20), ("soft_only", 0.2, 20),
                   ("pseudo_label", 0.2, 20), ("ce", 1.0, 100), ("kd", 1.0, 100)]
    assert runs[3].record["params"]["alpha"] == 1.0 and runs[2].record["params"]["alpha"] == 0.5
    assert "alpha" not in runs[4].record["params"]
    assert {r.record["train_size"] for r in runs} == {100}
    assert {len(r.record["history"]) for r in runs} == {1}
    assert len({r.record["run_key"] for r in runs}) == 7
    logits_file = list((kd.settings.ckpt_dir(dirs["options"].ckpt_dir) / "teacher").glob("*.logits.pt"))
    assert len(logits_file) == 1
    table = regimes.fraction_table(kd.results.to_frame(runs))
    assert list(table.method) == ["ce", "kd", "kd_unlabelled", "soft_only", "pseudo_label", "ce", "kd"]
    ce = table.set_index(["fraction", "method"])["acc_mean"]
    kd_row = table[(table.fraction == 0.2) & (table.method == "kd")].iloc[0]
    gap = ce[(1.0, "ce")] - ce[(0.2, "ce")]
    with np.errstate(divide="ignore", invalid="ignore"):   # tiny runs may tie: no gap to recover
        expected = np.float64(kd_row["acc_mean"] - ce[(0.2, "ce")]) / np.float64(gap)
    assert kd_row["recovered"] == pytest.approx(expected, nan_ok=True)
    assert table[table.fraction == 1.0]["recovered"].isna().all()
    again = regimes.few_label_runs(data, teacher, fractions=[0.2], seeds=[0], epochs=1,
                                   batch_size=20, arms=("kd_unlabelled",), **dirs)
    assert again[0].record == runs[2].record  # a finished run is only reloaded


def test_pseudo_labels_are_the_teachers_top_class_where_no_label_is():
    torch.manual_seed(0)
    net = torch.nn.Linear(5, 10)
    x, y, t = torch.randn(6, 5), torch.randint(0, 10, (6,)), torch.randn(6, 10)
    has = torch.tensor([True, False, True, False, False, True])
    out = kd.methods.pseudo_label_step(net, x, y, {"logits": t, "labelled": has})
    s = net(x)
    target = torch.where(has, y, t.argmax(1))
    per_image = F.cross_entropy(s, target, reduction="none")
    assert list(out) == ["ce", "pseudo"]
    assert out["ce"].item() == pytest.approx(per_image[has].sum().item() / 6, rel=1e-6)
    assert out["pseudo"].item() == pytest.approx(per_image[~has].sum().item() / 6, rel=1e-6)
    assert kd.losses.total(out).item() == pytest.approx(F.cross_entropy(s, target).item(), rel=1e-6)


# ---- beyond accuracy -------------------------------------------------------------------------

def test_calibration_error_of_overconfident_and_of_calibrated_predictions():
    labels = torch.arange(100) % 10
    sure = torch.full((100, 10), -30.0)
    sure[torch.arange(100), labels] = 30.0
    wrong_half = sure.clone()
    wrong_half[:50] = wrong_half[:50].roll(1, dims=1)   # confident and wrong on half the images
    assert regimes.calibration(sure, labels)["ece"] == pytest.approx(0.0, abs=1e-4)
    c = regimes.calibration(wrong_half, labels)
    assert c["ece"] == pytest.approx(50.0, abs=1e-3)
    assert c["count"][-1] == 100 and sum(c["count"]) == 100
    # confidence 0.6 everywhere, right on 60% of the images: calibrated
    p = torch.full((100, 10), 0.4 / 9)
    right = torch.arange(100) < 60
    pred = torch.where(right, labels, (labels + 1) % 10)
    p[torch.arange(100), pred] = 0.6
    assert regimes.calibration(p.log(), labels)["ece"] == pytest.approx(0.0, abs=1e-3)


def test_agreement_and_kl_with_the_teacher():
    labels = torch.arange(20) % 10
    t = torch.randn(20, 10, generator=torch.Generator().manual_seed(0))
    same = regimes.teacher_agreement(t, t, labels)
    assert same["agreement"] == 100.0 and same["kl_to_teacher"] == pytest.approx(0.0, abs=1e-6)
    flipped = regimes.teacher_agreement(-t, t, labels)
    assert flipped["agreement"] == 0.0 and flipped["kl_to_teacher"] > 0.5
    assert regimes.kl_to_teacher(t + 2.0, t) == pytest.approx(0.0, abs=1e-5)


def test_soft_entropy_is_zero_for_one_hot_targets_ln10_for_uniform_and_grows_with_temperature():
    confident = torch.zeros(4, 10)
    confident[:, 3] = 50.0
    assert regimes.soft_entropy(confident) == pytest.approx(0.0, abs=1e-6)
    assert regimes.soft_entropy(torch.full((4, 10), 2.0)) == pytest.approx(np.log(10), abs=1e-6)
    # two classes at logits 0 and ln 3: p = (1/4, 3/4) at T = 1, (1/2, 1/2) in the limit of T
    two = torch.tensor([[0.0, float(np.log(3.0))]])
    assert regimes.soft_entropy(two) == pytest.approx(-(0.25 * np.log(0.25) + 0.75 * np.log(0.75)), abs=1e-6)
    t = torch.randn(50, 10, generator=torch.Generator().manual_seed(1)) * 3
    assert regimes.soft_entropy(t, 1.0) < regimes.soft_entropy(t, 5.0) < regimes.soft_entropy(t, 50.0) < np.log(10)


# ---- summaries never average different runs as seeds ----------------------------------------

def test_runs_that_differ_only_in_a_weight_are_not_averaged_as_seeds(dirs):
    data = _tiny(100)
    teacher = book.teachers.get_teacher("lightnn", data, kd.train.Recipe(epochs=1, batch_size=50),
                                      **dirs)
    recipe = kd.train.Recipe(epochs=1, batch_size=20)
    a = kd.methods.train_seeds("kd", data, seeds=[0, 1], recipe=recipe, chapter="hinton_kd", teacher=teacher,
                               weights={"T": 2.0}, **dirs)
    b = kd.methods.train_seeds("kd", data, seeds=[0], recipe=recipe, chapter="hinton_kd", teacher=teacher,
                               weights={"T": 4.0}, **dirs)
    records = kd.results.load_records(dirs["options"].results_dir, chapter="hinton_kd")
    table = kd.results.summarize(records).set_index("variant")
    assert list(table["seeds"].sort_index()) == [2, 1]
    assert set(table.index) == {"T=2.0", "T=4.0"}
    assert table.loc["T=4.0", "acc_mean"] == b[0].test_acc
    assert table.loc["T=2.0", "acc_mean"] == pytest.approx((a[0].test_acc + a[1].test_acc) / 2)
    with pytest.raises(ValueError, match="holds runs of different experiments.*T=2.0, T=4.0"):
        kd.results.paired_comparison(records, baseline="kd")


def test_records_name_the_architecture_that_trained(dirs):
    data = _tiny(64)
    run = kd.train.fit(kd.models.build("resnet18", seed=0), data,
                       kd.train.Recipe(epochs=1, batch_size=32, lr=0.01, optimizer="sgd"),
                       chapter="t", method="ce", **dirs)
    assert run.record["model"] == "ResNet" and run.record["arch"] == "resnet18"
    student = kd.methods.HintStudent(kd.models.build("lightnn", seed=0))
    assert kd.models.arch_name(student.deployed) == "lightnn"
    assert kd.models.arch_name(book.airbench.build_airbench(0, data)) == "airbench"


# ---- fixed views: consistent teaching at the cost of a table ---------------------------------

class _Interrupt(Exception):
    pass


def _views_teacher(data, dirs):
    return book.teachers.get_teacher("lightnn", data, kd.train.Recipe(epochs=1, batch_size=50),
                                   **dirs)


def test_teacher_table_holds_exactly_the_teachers_output_on_each_view(dirs):
    data = _tiny(60)
    teacher = _views_teacher(data, dirs).model
    views = kd.data.FixedViews.draw(len(data.train_y), 3, seed=2)
    table = kd.loop.precompute_teacher(teacher, kd.methods.kd_targets, data, torch.device("cpu"),
                                        batch_size=25, views=views)["logits"]
    assert table.shape == (3 * 60, 10)
    idx = torch.tensor([0, 17, 59])
    for v in range(3):
        x = views.apply(data.train_x[idx], idx, torch.full_like(idx, v))
        with torch.no_grad():
            direct = teacher(kd.data.normalize(x, data.mean, data.std))
        assert torch.allclose(table[v * 60 + idx], direct, atol=1e-6)
    # the views differ from each other and from the plain image
    assert not torch.equal(views.apply(data.train_x[:8], torch.arange(8), torch.zeros(8, dtype=torch.long)),
                           views.apply(data.train_x[:8], torch.arange(8), torch.ones(8, dtype=torch.long)))
    assert views.dy.max() <= 8 and views.dx.min() >= 0


def test_each_epoch_draws_one_view_per_image_reproducibly_from_seed_and_epoch():
    data = _tiny(40)
    views = kd.data.FixedViews.draw(40, 4, seed=0)

    def epoch(e, seed=1):
        loader = kd.data.TensorLoader(data.train_x, data.train_y, 16, shuffle=True, seed=seed,
                                      views=views)
        loader.set_epoch(e)
        return [(x, key) for x, _, key in loader]
    a, b = epoch(3), epoch(3)
    assert all(torch.equal(x1, x2) and torch.equal(k1, k2) for (x1, k1), (x2, k2) in zip(a, b))
    keys = torch.cat([k for _, k in a])
    assert sorted((keys % 40).tolist()) == list(range(40))      # every image once per epoch
    assert not torch.equal(keys, torch.cat([k for _, k in epoch(4)]))
    x, key = a[0]
    img, view = key % 40, key // 40
    expected = kd.data.normalize(views.apply(data.train_x[img], img, view), data.mean, data.std)
    assert torch.equal(x, expected)
    assert len(set((keys // 40).tolist())) > 1                 # several views in one epoch


def test_run_with_fixed_views_resumes_on_the_same_views(dirs, tmp_path):
    data = _tiny(64)
    teacher = _views_teacher(data, dirs)
    recipe = kd.train.Recipe(epochs=3, batch_size=16, seed=4, views=4)
    step = kd.methods.kd_step
    kw = dict(chapter="t", method="kd")
    teach = Teacher(teacher.model, kd.methods.kd_targets)

    def opts(c, r):
        return RunOptions(ckpt_dir=str(tmp_path / c), results_dir=str(tmp_path / r), progress=False)
    whole = kd.train.fit(kd.models.build("lightnn", seed=4), data, recipe, step=step, teacher=teach,
                         options=opts("a", "ra"), **kw)
    calls = {"n": 0}

    @kd.fingerprint.watching(step)   # the same loss: the run's code fingerprint is unchanged
    def interrupting(*args):
        calls["n"] += 1
        if calls["n"] == 6:   # in the middle of epoch 2
            raise _Interrupt
        return step(*args)
    b = dict(options=opts("b", "rb"), teacher=teach)
    with pytest.raises(_Interrupt):
        kd.train.fit(kd.models.build("lightnn", seed=4), data, recipe, step=interrupting, **b, **kw)
    resumed = kd.train.fit(kd.models.build("lightnn", seed=4), data, recipe, step=step, **b, **kw)
    assert resumed.resumed_from_epoch == 1
    for k, v in whole.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    assert whole.record["params"]["views"] == 4
    with pytest.raises(ValueError, match="views replace the random crop"):
        kd.train.Recipe(epochs=1, augment=True, views=2)
    wrong = {"logits": torch.zeros(64, 10)}
    with pytest.raises(ValueError, match="one row per training image and view \\(256\\)"):
        kd.train.fit(kd.models.build("lightnn", seed=4), data, recipe, step=step,
                     teacher=Teacher(teacher.model, kd.methods.kd_targets, outputs=wrong),
                     options=opts("c", "rc"), **kw)


def test_view_runs_teach_the_seen_view_in_kd_and_the_plain_image_in_kd_inconsistent(dirs, monkeypatch):
    data = _tiny(100)
    teacher = _views_teacher(data, dirs)
    seen = []

    def recording_kd_step(model, x, y, t, *, T=5.0, alpha=0.5):
        seen.append((x.clone(), t["logits"].clone()))
        return kd.methods.kd_step(model, x, y, t, T=T, alpha=alpha)

    ce_seen = []

    def recording_ce_step(model, x, y, t):
        ce_seen.append(x.clone())
        return kd.methods.ce_step(model, x, y, t)

    registry = kd.methods.METHODS   # the arms' steps come from the registry
    for arm, step in (("kd", recording_kd_step), ("kd_inconsistent", recording_kd_step),
                      ("ce", recording_ce_step)):
        monkeypatch.setitem(registry, arm, registry[arm]._replace(step=step))
    runs = regimes.view_runs(data, teacher, fraction=0.5, views=3, epoch_counts=[1, 2],
                             seeds=[0], batch_size=25, **dirs)
    assert [(r.record["method"], r.record["epochs"]) for r in runs] == [
        ("ce", 1), ("kd", 1), ("kd_inconsistent", 1), ("ce", 2), ("kd", 2), ("kd_inconsistent", 2)]
    assert {r.record["train_size"] for r in runs} == {50}
    assert {r.record["params"]["images"] for r in runs} == {50}
    assert {r.record["params"]["views"] for r in runs} == {3}
    # 2 batches per epoch: kd (1 epoch), kd_inconsistent (1), kd (2 epochs), kd_inconsistent (2)
    assert len(seen) == 2 + 2 + 4 + 4
    net = teacher.model.eval()
    with torch.no_grad():
        mismatch = [(t - net(x)).abs().max().item() for x, t in seen]
    consistent = mismatch[:2] + mismatch[4:8]
    inconsistent = mismatch[2:4] + mismatch[8:]
    assert max(consistent) < 1e-4                      # the teacher's output on this very view
    assert min(inconsistent) > 1e-2                    # not on the view the student sees...
    idx = regimes.label_subset(data.train_y, 0.5, 0)
    plain = regimes.train_logits(teacher, data, "cpu", dirs["options"].ckpt_dir)[idx]
    rows = [(t[:, None] - plain[None]).abs().amax(2).min(1).values.max().item()
            for _, t in seen[2:4] + seen[8:]]
    assert max(rows) < 1e-6                            # ...but on the unaugmented image
    # the same views in every arm: the students of ce and kd see the same batches
    assert len(ce_seen) == 2 + 4
    for a, b in zip(ce_seen, [x for x, _ in seen[:2] + seen[4:8]]):
        assert torch.equal(a, b)
    frame = kd.results.to_frame(runs)
    table = regimes.view_table(frame)
    assert list(zip(table.epochs, table.method)) == [(1, "ce"), (1, "kd"), (1, "kd_inconsistent"),
                                                     (2, "ce"), (2, "kd"), (2, "kd_inconsistent")]
    assert table.set_index(["epochs", "method"]).loc[(2, "kd"), "acc_mean"] == runs[4].record["test_acc"]
    patience = regimes.patience_table(pd.concat([frame, frame.assign(seed=frame.seed + 1)]))
    assert list(patience.method) == ["ce", "kd", "kd_inconsistent"]
    for row, short, long in zip(patience.itertuples(), runs[:3], runs[3:]):
        assert row.diff_mean == pytest.approx(long.record["test_acc"] - short.record["test_acc"])
    with pytest.raises(ValueError, match="unknown arm"):
        regimes.view_runs(data, teacher, fraction=0.5, views=3, epoch_counts=[1], seeds=[0],
                          arms=("mixup",), **dirs)


def test_temperature_grid_pairs_each_cell_with_cross_entropy(dirs):
    data = _tiny(100)
    teacher = _views_teacher(data, dirs)
    runs = regimes.temperature_grid(data, teacher, temperatures=[1.0, 4.0], alphas=[0.5, 0.9],
                                    fraction=0.2, seeds=[0, 1], epochs=1, batch_size=20,
                                    **dirs)
    assert len(runs) == 2 + 2 * 2 * 2
    table = regimes.grid_table(kd.results.to_frame(runs))
    assert list(zip(table["T"], table["alpha"])) == [(1.0, 0.5), (1.0, 0.9), (4.0, 0.5), (4.0, 0.9)]
    frame = kd.results.to_frame(runs)
    ce = frame[frame.method == "ce"].set_index("seed")["test_acc"]
    for row in table.itertuples():
        cell = frame[frame["params"].map(lambda p: p.get("T") == row.T and p.get("alpha") == row.alpha)]
        diff = cell.set_index("seed")["test_acc"] - ce
        assert row.seeds == 2
        assert row.diff_mean == pytest.approx(diff.mean())
        assert row.ci_low < row.diff_mean < row.ci_high or diff.std() == 0
    assert "chosen" not in table   # no held-out set: nothing may be chosen from these runs
    with pytest.raises(ValueError, match="at least one"):
        regimes.temperature_grid(data, teacher, temperatures=[], alphas=[0.5], fraction=0.2,
                                 seeds=[0], epochs=1, **dirs)


def test_the_grid_cell_is_chosen_on_held_out_training_images_not_the_test_set(dirs):
    data = _tiny(100)
    teacher = _views_teacher(data, dirs)
    runs = regimes.temperature_grid(data, teacher, temperatures=[1.0, 4.0], alphas=[0.5],
                                    fraction=0.5, seeds=[0, 1], epochs=2, batch_size=20,
                                    val_size=30, **dirs)
    frame = kd.results.to_frame(runs)
    assert set(frame["train_size"]) == {70}   # 30 of the 100 training images held out
    table = regimes.grid_table(frame)
    val = frame.assign(v=[h[-1]["val_acc"] for h in frame["history"]])
    for row in table.itertuples():
        cell = val[val["params"].map(lambda p: p.get("T") == row.T)]
        assert row.val_mean == pytest.approx(cell["v"].mean())
    assert table["chosen"].sum() == 1
    assert table.loc[table["chosen"], "val_mean"].item() == table["val_mean"].max()


def test_an_interaction_is_the_change_of_a_paired_gain_with_its_interval():
    import pandas as pd
    rows = []
    # per seed: KD - CE is +1 at 10 epochs and +3, +2, +4 at 40: the gain grows by 2, 1, 3
    for seed, (ce10, kd10, ce40, kd40) in enumerate([(60, 61, 64, 67), (62, 63, 65, 67), (61, 62, 63, 67)]):
        rows += [dict(seed=seed, epochs=e, method=m, test_acc=float(a))
                 for e, m, a in ((10, "ce", ce10), (10, "kd", kd10), (40, "ce", ce40), (40, "kd", kd40))]
    rows.append(dict(seed=3, epochs=10, method="ce", test_acc=50.0))   # an unpaired run is left out
    got = kd.results.interaction(pd.DataFrame(rows), by="epochs", low=10, high=40, method="kd",
                                 baseline="ce")
    assert got["seeds"] == 3 and got["diff_mean"] == pytest.approx(2.0)
    half = 4.302653 * 1.0 / 3 ** 0.5   # t(0.975, 2 df) * std / sqrt(n); the std of 2, 1, 3 is 1
    assert (got["ci_low"], got["ci_high"]) == (pytest.approx(2 - half), pytest.approx(2 + half))
    with pytest.raises(ValueError, match="method='dkd' at epochs=40"):
        kd.results.interaction(pd.DataFrame(rows), by="epochs", low=10, high=40, method="dkd",
                               baseline="ce")


def test_paired_comparison_pairs_by_seed_and_its_interval_says_what_it_shows():
    import pandas as pd
    rows = []
    for seed, (ce, a, b) in enumerate([(60.0, 61.0, 59.5), (62.0, 63.5, 61.0), (61.0, 62.0, 60.0),
                                       (59.0, 60.5, 58.0), (63.0, 64.0, 62.5)]):
        rows += [dict(chapter="c", method=m, profile="full", seed=seed, test_acc=acc, params={"w": w},
                      data_source="d", train_size=1, test_size=1, teacher_key=None, model="M")
                 for m, acc, w in (("ce", ce, 0), ("a", a, 1), ("b", b, 2))]
    table = kd.results.paired_comparison(pd.DataFrame(rows), baseline="ce").set_index("method")
    # a - ce = [1, 1.5, 1, 1.5, 1]: mean 1.2, std 0.27386, t(0.975, 4) = 2.776445
    assert table.loc["a", "diff_mean"] == pytest.approx(1.2)
    assert table.loc["a", "ci_low"] == pytest.approx(1.2 - 2.776445 * 0.273861 / 5 ** 0.5, abs=1e-5)
    assert table.loc["a", "significant"] and not pd.notna(table.loc["ce"].get("diff_mean"))
    assert table.loc["b", "ci_high"] < 0
    verdict = kd.results.interval_verdict
    assert verdict(table.loc["a", "ci_low"], table.loc["a", "ci_high"]).endswith("a gain")
    assert verdict(table.loc["b", "ci_low"], table.loc["b", "ci_high"]).endswith("a loss")
    assert "no detectable difference" in verdict(-0.5, 0.25)
    assert verdict(float("nan"), float("nan")) == "too few paired seeds to tell"


def test_a_chapter_by_profile_pairs_each_scale_with_its_own_teacher():
    import pandas as pd
    rows = []
    for profile, size, tkey, pairs in (("cpu", 5000, "t1", [(40.0, 50.0), (42.0, 51.0), (41.0, 53.0)]),
                                       ("smoke", 320, "t0", [(10.0, 11.0), (12.0, 9.0)]),
                                       ("fast", 50000, "t2", [(90.0, 90.5), (90.2, 91.1), (90.1, 91.0)])):
        for seed, (ce, kdv) in enumerate(pairs):
            rows += [dict(chapter="resnet", method=m, profile=profile, seed=seed, test_acc=acc,
                          params={"epochs": size}, data_source="d", train_size=size, test_size=1,
                          teacher_key=key, model="M", device=f"dev-{profile}")
                     for m, acc, key in (("ce", ce, None), ("kd", kdv, tkey))]
    teachers = pd.DataFrame([dict(run_key=k, test_acc=acc, train_size=50000)
                             for k, acc in (("t0", 9.0), ("t1", 52.3), ("t2", 90.3))])
    table = kd.results.by_profile(pd.DataFrame(rows), teachers)
    assert list(table.index) == ["cpu", "fast"]                         # smoke left out
    assert table.loc["cpu", "teacher (%)"] == 52.3 and table.loc["fast", "teacher (%)"] == 90.3
    assert table.loc["cpu", "student images"] == 5000 and table.loc["cpu", "teacher images"] == 50000
    assert table.loc["cpu", "diff_mean"] == pytest.approx((10 + 9 + 12) / 3)
    assert table.loc["fast", "kd (%)"] == pytest.approx(90.8667, abs=1e-4) and table.loc["fast", "seeds"] == 3
    assert table.loc["fast", "ci_low"] < table.loc["fast", "diff_mean"] < table.loc["fast", "ci_high"]
    smoke_only = kd.results.by_profile(pd.DataFrame(rows[6:10]), teachers)
    assert smoke_only.empty and "diff_mean" in smoke_only
    with pytest.raises(ValueError, match="profile 'cpu'.*1 teacher.*0 found"):
        kd.results.by_profile(pd.DataFrame(rows), teachers[teachers.run_key != "t1"])


def test_paired_interval_of_per_seed_differences():
    one = kd.results.paired_interval([1.0, 1.5, 1.0, 1.5, 1.0])   # the 'a - ce' differences above
    assert one["diff_mean"] == pytest.approx(1.2) and one["diff_std"] == pytest.approx(0.273861, abs=1e-6)
    assert one["ci_low"] == pytest.approx(1.2 - 2.776445 * 0.273861 / 5 ** 0.5, abs=1e-5) and one["significant"]
    wide = kd.results.paired_interval([2.0, -1.0, 0.5])
    assert wide["ci_low"] < 0 < wide["ci_high"] and not wide["significant"]
    alone = kd.results.paired_interval([0.7])
    assert alone["diff_mean"] == 0.7 and alone["ci_low"] != alone["ci_low"] and not alone["significant"]


def test_a_teachers_line_says_what_produced_it():
    from types import SimpleNamespace
    record = {"method": "resnet50", "test_acc": 52.314, "epochs": 1, "train_size": 50000,
              "device": "cpu (2 threads, AMD EPYC, AVX2)", "wall_time_s": 4404.0}
    line = kd.results.describe_teacher(SimpleNamespace(record=record))
    assert line == ("teacher resnet50: 52.31% test accuracy (1 epoch over 50,000 training images, "
                    "cpu (2 threads, AMD EPYC, AVX2), 73.4 min of training)")
    record.update(epochs=10, method="deepnn")
    assert "(10 epochs over 50,000" in kd.results.describe_teacher(SimpleNamespace(record=record))
