"""Part II: the loop's new parts (exits, held-out selection, one-cycle, augmentation, speed
switches), the self-distillation and feature-KD steps, the pretrained teacher's fallback."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kdutils as kd
from kdutils import book
from kdutils.data import ImageData, random_erasing
from kdutils.loop import evaluate_exits
from kdutils.losses import total
from kdutils.settings import RunOptions
from kdutils.speed import Speed
from kdutils.train import Recipe, fit


def _tiny(n_train=64, n_test=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n_train + n_test) % 10
    x = torch.randint(0, 256, (n_train + n_test, 3, 32, 32), dtype=torch.uint8, generator=g)
    x[:, 0] = (y * 25).to(torch.uint8).view(-1, 1, 1)  # a learnable signal
    return ImageData(x[:n_train], y[:n_train], x[n_train:], y[n_train:], kd.data.CIFAR10_CLASSES, "synthetic")


@pytest.fixture
def dirs(tmp_path):
    return dict(ckpt_dir=str(tmp_path / "ck"), results_dir=str(tmp_path / "res"), progress=False)


@pytest.fixture
def opts(dirs):
    """The run options of :func:`dirs`: a temporary folder, no progress bars."""
    return RunOptions(**dirs)


# ---- exits and the ensemble -----------------------------------------------------------------

class _FixedExits(nn.Module):
    """Two exits with fixed logits per image: exit 1 right on images 0-1, exit 2 on 1-2."""

    def __init__(self, logits1, logits2):
        super().__init__()
        self.l1, self.l2 = logits1, logits2
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return [self.l1, self.l2], [x, x]


def test_evaluate_exits_reports_each_exit_and_the_softmax_ensemble():
    y = torch.tensor([0, 1, 2, 3])
    l1 = torch.full((4, 10), -5.0)
    l2 = torch.full((4, 10), -5.0)
    l1[0, 0] = l1[1, 1] = 5.0; l1[2, 5] = 2.0; l1[3, 6] = 5.0   # exit 1: images 0, 1 right
    l2[1, 1] = 5.0; l2[2, 2] = 5.0; l2[0, 7] = 1.0; l2[3, 3] = 0.5  # exit 2: 1, 2, 3 right (3 weakly)
    # No image is a tie between the exits (the smallest margin of the averaged probabilities
    # is 0.004), so the ensemble's answer does not depend on the CPU's summation order.
    probs = (l1.softmax(1) + l2.softmax(1)) / 2
    top2 = probs.topk(2, dim=1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-3
    out = evaluate_exits(_FixedExits(l1, l2), [(torch.zeros(4, 1), y, None)])
    assert out["exit_acc"] == [50.0, 75.0] and out["acc"] == 75.0
    assert out["ensemble_acc"] == 100.0 * (probs.argmax(1) == y).float().mean().item()
    assert out["ensemble_acc"] == 75.0  # image 3: exit 1's confident wrong answer wins


def test_multi_exit_run_records_every_exit(opts, monkeypatch):
    monkeypatch.delenv("KD_KEEP_MEMORY", raising=False)   # keeping freed memory is opt-in
    data = _tiny(32, 20)
    recipe = Recipe(epochs=1, batch_size=16, lr=0.01, optimizer="sgd", augment=True)
    run = fit(kd.models.build("resnet18_multiexit", seed=0), data, recipe, chapter="t",
              method="byot", step=kd.methods.byot_step, options=opts)
    assert len(run.record["exit_acc"]) == 4
    assert run.record["test_acc"] == run.record["exit_acc"][-1]
    assert 0 <= run.record["ensemble_acc"] <= 100
    assert run.record["speed"] == {"channels_last": False, "amp": "off", "compile": False,   # CPU defaults
                                   "keep_memory": kd.speed.freed_memory_kept()}   # only if asked


# ---- held-out selection ---------------------------------------------------------------------

def test_holdout_is_disjoint_seeded_and_leaves_test_alone():
    data = _tiny(100, 40)
    a, b = data.holdout(20, seed=1), data.holdout(20, seed=1)
    assert len(a.train_y) == 80 and len(a.val_y) == 20 and torch.equal(a.test_x, data.test_x)
    assert torch.equal(a.val_x, b.val_x)
    rows = {tuple(r[1:].flatten().tolist()) for r in a.train_x}
    assert not any(tuple(r[1:].flatten().tolist()) in rows for r in a.val_x)
    for bad in (0, 100, -3):
        with pytest.raises(ValueError, match="val_size must be between 1 and 99"):
            data.holdout(bad)


def test_select_val_keeps_the_best_held_out_epoch_not_the_last(opts, monkeypatch):
    data = _tiny(80, 40).holdout(20)
    scripted = iter([10.0, 60.0, 30.0] * 2)  # held-out accuracy per epoch: best is epoch 2
    real = kd.loop.evaluate_exits
    saved = {}

    def fake(model, loader, amp=None):
        out = real(model, loader, amp)
        if len(loader.y) == 20:  # the held-out loader
            out["acc"] = next(scripted)
            saved[len(saved)] = {k: v.clone() for k, v in model.state_dict().items()}
        return out
    monkeypatch.setattr(kd.train, "evaluate_exits", fake)   # what fit's evaluation calls
    run = fit(kd.models.build("lightnn", seed=0), data, Recipe(epochs=3, batch_size=20), chapter="t",
              method="ce", select="val", options=opts)
    assert run.record["selected_epoch"] == 2 and run.record["val_acc"] == 60.0
    assert run.record["test_acc"] == run.record["history"][1]["test_acc"]
    assert all(torch.equal(v, saved[1][k]) for k, v in run.model.state_dict().items())
    with pytest.raises(ValueError, match="select='val' needs a held-out set"):
        fit(kd.models.build("lightnn"), _tiny(), Recipe(epochs=1), chapter="t", method="ce",
            select="val", options=opts)


# ---- schedule and augmentation --------------------------------------------------------------

def test_onecycle_rises_then_falls_per_step(opts):
    run = fit(kd.models.build("lightnn", seed=0), _tiny(64, 20),
              Recipe(epochs=4, batch_size=16, lr=0.1, optimizer="sgd", schedule="onecycle"),
              chapter="t", method="ce", options=opts)
    lrs = [h["lr"] for h in run.record["history"]]  # the learning rate at the start of each epoch
    assert lrs[0] == pytest.approx(0.1 / 25) and lrs[1] > lrs[0] and lrs[3] < lrs[2]


def test_random_erasing_rate_area_and_reproducibility():
    x = torch.ones(2000, 3, 32, 32)
    out = random_erasing(x, torch.Generator().manual_seed(0), p=0.5)
    area = (out[:, 0] == 0).float().mean((1, 2))
    hit = area > 0
    assert 0.45 < hit.float().mean() < 0.55
    # areas drawn from U(0.02, 0.33) of the image, up to rounding the sides to whole pixels
    assert area[hit].min() >= 0.01 and area[hit].max() <= 0.36
    assert area[hit].mean().item() == pytest.approx(0.175, abs=0.015)
    assert torch.equal(out, random_erasing(x, torch.Generator().manual_seed(0), p=0.5))
    assert torch.equal(random_erasing(x, torch.Generator().manual_seed(0), p=0.0), x)


def test_speed_precision_choices():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    # before any measurement (a CPU run then times what is left to choose)
    assert not Speed().layout(cpu) and Speed().layout(cuda) and Speed(channels_last=True).layout(cpu)
    assert Speed().precision(cpu) is None
    assert Speed(amp="bf16").precision(cpu) is torch.bfloat16
    assert Speed(amp="off").precision(cuda) is None
    assert Speed(amp="fp16").precision(cuda) is torch.float16
    with pytest.raises(ValueError, match="amp must be"):
        Speed(amp="int8").precision(cpu)


# ---- the Part II steps ----------------------------------------------------------------------

def test_hook_self_distillation_trains_its_projection_and_weight_zero_is_ce():
    torch.manual_seed(0)
    model = kd.methods.HookSelfDistill(kd.models.build("resnet18"))
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    terms = kd.methods.hook_sd_step(model, x, y, None, hook_weight=0.5)
    assert list(terms) == ["hook", "ce"]
    total(terms).backward()
    assert model.proj.weight.grad.abs().sum() > 0
    assert any(p is model.proj.weight for p in kd.train.make_optimizer(model, Recipe(epochs=1)).param_groups[0]["params"])
    model.eval()
    assert total(kd.methods.hook_sd_step(model, x, y, None, hook_weight=0.0)).item() == pytest.approx(
        F.cross_entropy(model(x), y).item(), rel=1e-6)
    assert kd.models.count_params(model) - kd.models.count_params(model.deployed) == 128 * 512 + 512
    assert all(not m._forward_hooks for m in model.modules())


def test_hook_term_teaches_the_shallow_layers_and_sends_no_gradient_into_layer3_or_layer4():
    torch.manual_seed(0)
    model = kd.methods.HookSelfDistill(kd.models.build("resnet18"))
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    # the hook term alone: total loss at weight 1 (no cross-entropy)
    total(kd.methods.hook_sd_step(model, x, y, None, hook_weight=1.0)).backward()

    def grad_norm(module):
        return sum(p.grad.abs().sum().item() for p in module.parameters() if p.grad is not None)

    assert grad_norm(model.net.layer3) == 0 and grad_norm(model.net.layer4) == 0
    assert grad_norm(model.net.fc) == 0
    assert grad_norm(model.net.layer2) > 0 and grad_norm(model.net.layer1) > 0
    assert grad_norm(model.proj) > 0
    # ... and with cross-entropy, layer3 and layer4 learn from the labels only
    model.zero_grad(set_to_none=True)
    total(kd.methods.hook_sd_step(model, x, y, None, hook_weight=0.5)).backward()
    mixed = [p.grad.clone() for p in model.net.layer4.parameters()]
    model.zero_grad(set_to_none=True)
    (0.5 * F.cross_entropy(model(x), y)).backward()
    for a, b in zip(mixed, model.net.layer4.parameters()):
        assert torch.allclose(a, b.grad, atol=1e-7, rtol=1e-5)


def test_feature_kd_matches_shapes_and_only_the_student_learns():
    torch.manual_seed(0)
    teacher = kd.loop.freeze(kd.models.build("resnet18"))
    student = kd.methods.FeatureKDStudent(kd.models.SmallCNN(image_size=32))
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    t = kd.methods.feature_targets(teacher, x)
    assert tuple(t["map"].shape) == (4, 512, 4, 4)
    terms = kd.methods.feature_kd_step(student, x, y, t, feature_weight=0.3)
    assert list(terms) == ["ce", "feature"]
    total(terms).backward()
    assert student.proj.weight.grad.abs().sum() > 0 and student.student.features[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    s, m = kd.methods.match_maps(torch.zeros(1, 512, 14, 14), torch.zeros(1, 512, 7, 7))
    assert s.shape == m.shape == (1, 512, 7, 7)
    s, m = kd.methods.match_maps(torch.zeros(1, 512, 2, 2), torch.ones(1, 512, 4, 4))
    assert s.shape == m.shape == (1, 512, 2, 2) and torch.all(m == 1)


def test_small_cnn_sizes():
    assert kd.models.count_params(kd.models.SmallCNN(image_size=32)) == 847_146
    assert kd.models.count_params(kd.models.SmallCNN(image_size=224)) == 13_430_058
    assert kd.models.SmallCNN(image_size=224)(torch.zeros(1, 3, 224, 224)).shape == (1, 10)
    with pytest.raises(ValueError, match="multiple of 16"):
        kd.models.SmallCNN(image_size=100)


def test_an_offline_download_of_pretrained_weights_shows_no_machine_path(tmp_path, monkeypatch, capsys):
    """torch announces a download with the cache's full path, on stdout: a page must not show it,
    only the error that says what to do (with the cache as ~/...)."""
    import urllib.error
    from kdutils.book import audit
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / ".cache" / "torch"))   # nothing cached there

    def offline(url, dst, *a, **k):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(kd.models.WeightsUnavailable) as e:
        kd.models.pretrained_resnet18()
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    assert "~/.cache/torch/hub/checkpoints/" in str(e.value) and str(tmp_path) not in str(e.value)


def test_pretrained_teacher_falls_back_to_the_books_own_teacher_when_offline(dirs, monkeypatch, capsys):
    import torchvision

    def offline(*a, **k):
        if k.get("weights") is not None:
            raise OSError("no network")
        return real(*a, **k)
    real = torchvision.models.resnet18
    monkeypatch.setattr(torchvision.models, "resnet18", offline)
    with pytest.raises(kd.models.WeightsUnavailable, match="teacher_weights='none'"):
        kd.models.pretrained_resnet18()
    P = book.chapters.check("pretrained_teacher", profile="smoke", **dirs)  # CIFAR-10 at 32 px
    data = _tiny(64, 20)
    x = kd.data.normalize(data.train_x[:4], data.mean, data.std)

    # CIFAR-10 at 32 px: chapter 6's airbench network, whose named layer feature KD can match
    chosen = book.teachers.pretrained_teacher(P, data)
    assert "book's own CIFAR-10 teacher" in capsys.readouterr().out
    assert chosen.how == "airbench" and isinstance(chosen.run.model, book.airbench.AirbenchNet)
    assert chosen.run.record["epochs"] == P.teacher_epochs and chosen.run.record["train_size"] == 64
    feature_map = kd.methods.feature_targets(chosen.run.model, x, layer=chosen.layer)["map"]
    assert (chosen.layer, chosen.channels, feature_map.shape[1]) == ("groups.2", 256, 256)
    assert not any(p.requires_grad for p in chosen.run.model.parameters())  # loaded frozen

    # any other data: a ResNet18 trained from scratch on the chapter's own images
    other = book.params.Params({**P, "dataset": "stl10"})
    chosen = book.teachers.pretrained_teacher(other, data)
    assert "Falling back to a ResNet18 trained from scratch" in capsys.readouterr().out
    assert chosen.how == "scratch" and chosen.run.record["epochs"] == P.teacher_epochs
    feature_map = kd.methods.feature_targets(chosen.run.model, x, layer=chosen.layer)["map"]
    assert (chosen.layer, chosen.channels, feature_map.shape[1]) == ("layer4", 512, 512)


def test_chapter_10_without_imagenet_weights_asks_for_chapter_6s_own_teacher(monkeypatch, dirs):
    """Outside the smoke profile the fallback is the very checkpoint chapter 6 trains: all of
    CIFAR-10, chapter 6's recipe and profile, the same folders."""
    class Asked(Exception):
        pass

    asked = {}
    everything = _tiny(64, 20)

    def strong_teacher(data, recipe, **kw):
        asked.update(data=data, recipe=recipe, **kw)
        raise Asked

    monkeypatch.delenv("KD_PROFILE", raising=False)  # the suite forces smoke otherwise
    monkeypatch.setattr(kd.data, "load_cifar10", lambda data_dir=None, **k: everything)
    monkeypatch.setattr(book.airbench, "get_strong_teacher", strong_teacher)
    P = book.chapters.check("pretrained_teacher", profile="cpu", teacher_weights="none", **dirs)
    with pytest.raises(Asked):
        book.teachers.pretrained_teacher(P, _tiny(32, 20))
    ch6 = book.chapters.check("when_distillation_pays", **dirs)
    assert asked["data"] is everything
    assert asked["recipe"] == book.airbench.AirbenchRecipe(epochs=ch6.teacher_epochs)
    assert asked["options"] == kd.settings.run_options(ch6)


def test_part_two_profiles(monkeypatch):
    monkeypatch.delenv("KD_PROFILE", raising=False)  # the suite forces smoke otherwise
    cpu = book.chapters.check("resnet50_to_resnet18", profile="cpu")
    assert (cpu.train_size, cpu.epochs, cpu.teacher_epochs, cpu.seeds, cpu.schedule) == (5000, 3, 1, [0, 1, 2], "onecycle")
    # its teacher learns from every training image; everything is tested on every test image
    assert (cpu.teacher_train_size, cpu.test_size) == (None, None)
    assert "teacher_train_size" not in book.chapters.check("resnet50_to_resnet18", profile="smoke")
    assert "teacher_train_size" not in book.chapters.check("self_distillation", profile="cpu")
    assert book.chapters.check("resnet50_to_resnet18", profile="full").epochs == 200
    # "auto" (the chapters' default) is the GPU recipe on a GPU, the reduced one without
    assert book.chapters.check("resnet50_to_resnet18", device="cpu").profile == "cpu"
    assert book.chapters.check("resnet50_to_resnet18", device="cuda").epochs == 30
    assert book.chapters.auto_profile("auto") == ("fast" if torch.cuda.is_available() else "cpu")
    assert book.chapters.check("pretrained_teacher", profile="cpu").dataset == "cifar10"
    with pytest.raises(book.params.ParameterError, match=r"parameter 'profile' = 'cpu' is not allowed: it must be one of 'full', 'smoke'"):
        book.chapters.check("hinton_kd", profile="cpu")
    with pytest.raises(book.params.ParameterError, match="parameter 'amp' = 'fp8'"):
        book.chapters.check("resnet50_to_resnet18", amp="fp8")


def test_chapter_8_teacher_learns_from_the_images_its_profile_gives_it(monkeypatch):
    monkeypatch.delenv("KD_PROFILE", raising=False)
    data, loaded, asked = _tiny(), [], {}
    monkeypatch.setattr(book.recipes, "load_data", lambda P, train_size="students": loaded.append(train_size) or "all")
    smoke = book.chapters.check("resnet50_to_resnet18", profile="smoke")
    cpu = book.chapters.check("resnet50_to_resnet18", profile="cpu")
    assert book.recipes.teacher_data(smoke, data) is data and loaded == []   # the students' images
    assert book.recipes.teacher_data(cpu, data) == "all" and loaded == [None]  # every training image
    monkeypatch.setattr(book.teachers, "get_teacher", lambda name, d, recipe, **kw: asked.update(
        name=name, data=d, epochs=recipe.epochs, test=kw["options"].profile))
    book.recipes.resnet_teacher(cpu, data)
    assert asked == {"name": "resnet50", "data": "all", "epochs": 1, "test": "cpu"}


def test_a_chapters_setup_checks_its_parameters_loads_its_images_and_fills_its_box(monkeypatch, capsys):
    monkeypatch.delenv("KD_PROFILE", raising=False)
    loaded, glued = [], {}
    monkeypatch.setattr(book.recipes, "load_data", lambda P: loaded.append((P.train_size, P.test_size)) or _tiny())
    monkeypatch.setattr(book.notebook, "glue", lambda name, value, display=False: glued.update({name: value}))
    notebook = {**book.chapters.CHAPTERS["resnet50_to_resnet18"].defaults, "profile": "cpu", "device": "cpu",
                "In": [""]}
    P, data = book.notebook.setup(notebook, chapter="resnet50_to_resnet18", box="c7")
    assert (P.profile, P.seeds, P.epochs) == ("cpu", [0, 1, 2], 3) and len(data.train_y) == 64
    assert loaded == [(5000, None)]                      # the cpu profile's images, every test image
    assert glued.pop("c7_device").startswith("cpu (")
    assert glued == {"c7_profile": "cpu", "c7_train_size": 64, "c7_test_size": 40,
                     "c7_profile_says": book.params.profile_note("cpu")}
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "run:    profile=cpu, epochs=3, seeds=[0, 1, 2], train_size=5000"
    assert out[1] == "data:   synthetic" and out[2].startswith("device: cpu (")
    # the parameter cell said 30 epochs, batch 256...: the page says what the profile set instead
    assert out[3].startswith("the cpu profile sets: epochs=3, batch_size=64, lr=0.05")
    glued.clear()
    book.notebook.setup(notebook, chapter="resnet50_to_resnet18")   # no box: nothing glued
    assert glued == {} and len(loaded) == 2
    with pytest.raises(book.params.ParameterError, match="alpah"):  # a misspelt papermill -p name
        book.notebook.setup({**notebook, "alpah": 0.5}, chapter="resnet50_to_resnet18")
    assert len(loaded) == 2                               # caught before any image is read


def test_imagenet_sized_datasets_fail_clearly_offline(tmp_path):
    with pytest.raises(ValueError, match="CIFAR-10 images are 32 px"):
        kd.data.load_dataset("cifar10", image_size=224)
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        kd.data.load_dataset("mnist", tmp_path)
    with pytest.raises(kd.data.DataNotFoundError, match=r"stl10 is not in .* could not be downloaded"):
        kd.data.load_dataset("stl10", tmp_path, image_size=96, download=False)
