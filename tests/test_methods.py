"""The methods registry and what a run's identity is made of: a teacher's weights and a
student's initial weights name a run; DKD against its formula, its warm-up, every
registered method's step on a tiny batch."""
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

import kdutils as kd
from kdutils.loop import Progress, Teacher
from kdutils.settings import RunOptions
from kdutils.train import Recipe, fit

# the methods the book's chapters train, and the one they do not (yet)
BOOK_METHODS = {"ce", "kd", "cosine", "hint", "feature_kd", "hook_sd", "byot", "kd_unlabelled", "pseudo_label",
                "kd_inconsistent"}



@pytest.fixture
def options(tmp_path):
    return RunOptions(ckpt_dir=str(tmp_path / "ckpt"), results_dir=str(tmp_path / "results"),
                      progress=False)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- a): what names a run ---------------------------------------------------------------------

def test_teachers_that_differ_only_in_weights_train_two_different_students(tiny, options, capsys):
    """Two teachers of one class, without a key, differing only in their weights: the same
    student seed, recipe and data make two runs (before, both were keyed by the teacher's key
    alone, None, and the second run reloaded the first one's student)."""
    teachers = [Teacher(kd.models.build("lightnn", seed=s), kd.methods.kd_targets) for s in (1, 2)]
    assert type(teachers[0].model) is type(teachers[1].model) and teachers[0].key is None
    recipe = Recipe(epochs=2, batch_size=16, seed=0)

    def train(teacher):
        return fit(kd.models.build("lightnn", seed=0), tiny, recipe, chapter="hinton_kd",
                   method="kd", step=kd.methods.kd_step, teacher=teacher,
                   params={"T": 5.0, "alpha": 0.5}, options=options)
    first, second = train(teachers[0]), train(teachers[1])
    assert first.record["run_key"] != second.record["run_key"]
    assert first.checkpoint != second.checkpoint
    assert first.checkpoint.is_file() and second.checkpoint.is_file()
    assert first.record_path != second.record_path
    assert second.resumed_from_epoch == 0           # trained, not the first run reloaded
    # the record names each teacher by its weights
    assert [r.record["teacher_key"] for r in (first, second)] == \
        [kd.runs.weights_hash(t.model) for t in teachers]
    assert first.record["teacher_key"] != second.record["teacher_key"]
    assert not _same(_state(first.model), _state(second.model))
    capsys.readouterr()
    again = train(teachers[0])
    assert f"{first.checkpoint.name}: finished run, reloaded" in capsys.readouterr().out
    assert again.resumed_from_epoch == 2 and again.record["run_key"] == first.record["run_key"]
    assert _same(_state(again.model), _state(first.model))
    # a teacher with a key is named by it, whatever its weights
    keyed = [Teacher(t.model, t.targets, key="teacher-run") for t in teachers]
    paths = [kd.runs.run_paths(kd.models.build("lightnn", seed=0), tiny, recipe, chapter="hinton_kd",
                               method="kd", params={}, teacher=t, options=options) for t in keyed]
    assert paths[0] == paths[1] and kd.runs.teacher_identity(keyed[0]) == "teacher-run"


def test_students_whose_initial_weights_differ_are_different_runs(tiny, options):
    recipe = Recipe(epochs=1, batch_size=32, seed=0)

    def paths(model):
        return kd.runs.run_paths(model, tiny, recipe, chapter="baseline", method="ce", params={},
                                 options=options)
    plain = kd.models.build("lightnn", seed=0)
    reinit = kd.models.build("lightnn", seed=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        torch.nn.init.xavier_uniform_(reinit.classifier[-1].weight)   # another init, same class
    assert paths(plain) == paths(kd.models.build("lightnn", seed=0))   # same weights: same run
    assert paths(plain)[0] != paths(reinit)[0] and paths(plain)[1] != paths(reinit)[1]
    runs = [fit(m, tiny, recipe, chapter="baseline", method="ce", options=options)
            for m in (plain, reinit)]
    assert runs[0].record["run_key"] != runs[1].record["run_key"]
    assert runs[1].resumed_from_epoch == 0 and runs[0].checkpoint != runs[1].checkpoint


# ---- b): DKD against its formula ---------------------------------------------------------------

S = torch.tensor([[2.0, 0.5, -1.0, 0.3], [0.1, 0.2, 0.3, -0.4], [-1.0, 3.0, 0.0, 1.0]])
T_LOGITS = torch.tensor([[3.0, 1.0, -2.0, 0.0], [0.0, 2.0, 0.5, 1.5], [0.5, 4.0, -1.0, 2.0]])
Y = torch.tensor([0, 2, 1])


def _softmax(z, T):
    e = [math.exp(v / T) for v in z]
    return [v / sum(e) for v in e]


def _kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def _dkd_by_hand(s, t, y, T):
    """Per row: (TCKD, NCKD, p^t_y) without the weights or T^2, written out."""
    rows = []
    for i in range(len(s)):
        p, q, k = _softmax(t[i].tolist(), T), _softmax(s[i].tolist(), T), int(y[i])
        b_t, b_s = [p[k], 1 - p[k]], [q[k], 1 - q[k]]                     # target vs the rest
        p_hat = [v / (1 - p[k]) for j, v in enumerate(p) if j != k]       # the other classes
        q_hat = [v / (1 - q[k]) for j, v in enumerate(q) if j != k]
        rows.append((_kl(b_t, b_s), _kl(p_hat, q_hat), p[k]))
    return rows


@pytest.mark.parametrize("T", [1.0, 4.0])
@pytest.mark.parametrize("alpha, beta", [(1.0, 1.0), (1.5, 8.0)])
def test_dkd_terms_match_the_formula(T, alpha, beta):
    rows = _dkd_by_hand(S, T_LOGITS, Y, T)
    expected = {"tckd": torch.tensor(alpha * T**2 * sum(r[0] for r in rows) / len(rows)),
                "nckd": torch.tensor(beta * T**2 * sum(r[1] for r in rows) / len(rows))}
    got = kd.losses.dkd_terms(S, T_LOGITS, Y, alpha=alpha, beta=beta, T=T)
    assert list(got) == ["tckd", "nckd"]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    assert all(v.item() > 1e-3 for v in got.values())   # both terms say something here
    same = kd.losses.dkd_terms(T_LOGITS, T_LOGITS, Y, alpha=alpha, beta=beta, T=T)
    # (float32 rounding, times beta * T^2 = 128 at most here)
    torch.testing.assert_close(same, {"tckd": torch.tensor(0.0), "nckd": torch.tensor(0.0)},
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_kd_is_tckd_plus_one_minus_the_teachers_target_probability_times_nckd(T):
    rows = _dkd_by_hand(S, T_LOGITS, Y, T)
    for i, (_, _, p_target) in enumerate(rows):
        s, t, y = S[i:i + 1], T_LOGITS[i:i + 1], Y[i:i + 1]
        terms = kd.losses.dkd_terms(s, t, y, alpha=1.0, beta=1.0, T=T)
        kd_i = kd.losses.soft_target_loss(s, t, T)
        torch.testing.assert_close(kd_i, terms["tckd"] + (1 - p_target) * terms["nckd"], rtol=1e-5, atol=1e-7)
        # DKD's point: the factor (1 - p_t) is not 1, so KD weights the non-target term down
        assert 0 < 1 - p_target < 1


def test_dkd_with_beta_0_leaves_only_the_target_term():
    s = S.clone().requires_grad_(True)
    only = kd.losses.dkd_terms(s, T_LOGITS, Y, alpha=1.0, beta=0.0, T=4.0)
    full = kd.losses.dkd_terms(S, T_LOGITS, Y, alpha=1.0, beta=8.0, T=4.0)
    assert only["nckd"].item() == 0.0 and full["nckd"].item() > 0
    torch.testing.assert_close(only["tckd"], full["tckd"])
    rows = _dkd_by_hand(S, T_LOGITS, Y, 4.0)
    torch.testing.assert_close(kd.losses.total(only), torch.tensor(16 * sum(r[0] for r in rows) / 3),
                               rtol=1e-5, atol=1e-7)
    # and its gradient is the target term's alone
    kd.losses.total(only).backward()
    s2 = S.clone().requires_grad_(True)
    kd.losses.dkd_terms(s2, T_LOGITS, Y, alpha=1.0, beta=8.0, T=4.0)["tckd"].backward()
    torch.testing.assert_close(s.grad, s2.grad)


# ---- c): DKD's warm-up follows the epoch -------------------------------------------------------

def test_dkd_step_warms_up_both_terms_with_the_epoch_and_leaves_ce_alone():
    torch.manual_seed(0)
    net = torch.nn.Linear(5, 4)
    x, t = torch.randn(3, 5), {"logits": T_LOGITS}
    step = partial(kd.methods.dkd_step, alpha=1.0, beta=8.0, T=4.0, warmup=4)
    base = step(net, x, Y, t)                      # no progress: no warm-up
    assert list(base) == ["ce", "tckd", "nckd"]
    assert base["ce"].item() == pytest.approx(F.cross_entropy(net(x), Y).item(), rel=1e-6)
    torch.testing.assert_close({k: base[k] for k in ("tckd", "nckd")},
                               kd.losses.dkd_terms(net(x), T_LOGITS, Y, alpha=1.0, beta=8.0, T=4.0))
    for epoch, factor in ((0, 0.25), (1, 0.5), (2, 0.75), (3, 1.0), (9, 1.0)):
        got = step(net, x, Y, t, progress=Progress(epoch, 10))
        assert got["ce"].item() == base["ce"].item(), epoch
        for name in ("tckd", "nckd"):
            assert got[name].item() == pytest.approx(factor * base[name].item(), rel=1e-6), (epoch, name)
    # the ce weight scales the cross-entropy only
    weighted = step(net, x, Y, t, ce_weight=0.5, progress=Progress(0, 10))
    assert weighted["ce"].item() == pytest.approx(0.5 * base["ce"].item(), rel=1e-6)


def test_the_loop_gives_progress_to_a_step_that_asks_for_it(tiny, options):
    torch.manual_seed(0)
    net = torch.nn.Linear(5, 10)
    batches = [(torch.randn(4, 5), torch.tensor([0, 1, 2, 3]), None) for _ in range(3)]
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    got = []

    def asks(model, x, y, t, *, progress=None):
        got.append(progress)
        return F.cross_entropy(model(x), y)

    def plain(model, x, y, t):   # no progress keyword: called as before (else a TypeError)
        got.append("plain")
        return F.cross_entropy(model(x), y)

    kd.loop.train_epoch(net, batches, asks, opt, progress=Progress(2, 5))
    assert got == [Progress(2, 5)] * 3
    got.clear()
    kd.loop.train_epoch(net, batches, plain, opt, progress=Progress(2, 5))
    assert got == ["plain"] * 3
    got.clear()
    kd.loop.train_epoch(net, batches, asks, opt)   # no progress given: the step's default
    assert got == [None] * 3
    assert kd.loop.takes_progress(partial(kd.methods.dkd_step, beta=2.0))
    assert not kd.loop.takes_progress(kd.methods.kd_step)
    # fit gives it every epoch
    got.clear()

    def conv_asks(model, x, y, t, *, progress=None):
        got.append(progress)
        return F.cross_entropy(model(x), y)
    fit(kd.models.build("lightnn", seed=0), tiny, Recipe(epochs=2, batch_size=32), chapter="t",
        method="ce", step=conv_asks, options=options)
    assert got == [Progress(0, 2)] * 2 + [Progress(1, 2)] * 2


# ---- d): the registry --------------------------------------------------------------------------

# the terms each step returns
TERMS = {"ce": ["ce"], "pseudo_label": ["ce", "pseudo"], "kd": ["kd", "ce"], "kd_inconsistent": ["kd", "ce"],
         "kd_unlabelled": ["kd", "ce"], "cosine": ["cosine", "ce"], "hint": ["hint", "ce"],
         "dkd": ["ce", "tckd", "nckd"], "byot": ["ce", "kd", "feature"], "hook_sd": ["hook", "ce"],
         "feature_kd": ["ce", "feature"]}


def _setup(method):
    """A tiny student (in the method's wrapper), its teacher and targets, for ``method``; the
    name of the training-only module the step must train (None without one)."""
    entry = kd.methods.METHODS[method]
    targets, extra = entry.targets, None
    if method == "byot":
        student, teacher = kd.models.build("resnet18_multiexit", seed=0), None
    elif method == "hook_sd":
        student, teacher, extra = entry.wrap(kd.models.build("resnet18", seed=0), 0), None, "proj"
    elif method == "feature_kd":
        student = kd.methods.FeatureKDStudent(kd.methods.seeded(lambda: kd.models.SmallCNN(image_size=32), 0))
        teacher, extra = kd.models.build("resnet18", seed=1), "proj"
        targets = partial(kd.methods.feature_targets, layer="layer4")
    else:   # Part I: LightNN, taught by DeepNN
        student = kd.models.build("lightnn", seed=0)
        student = entry.wrap(student, 0) if entry.wrap is not None else student
        teacher = kd.models.build("deepnn", seed=1) if targets is not None else None
        extra = "regressor" if method == "hint" else None
    return student, kd.loop.freeze(teacher) if teacher is not None else None, targets, extra


def test_the_books_methods_and_dkd_are_registered():
    assert BOOK_METHODS | {"dkd"} <= set(kd.methods.METHODS)
    assert set(kd.methods.METHODS) <= set(TERMS), "a new method: add its terms and a tiny setup here"
    for name, entry in kd.methods.METHODS.items():
        needs_teacher = name not in ("ce", "byot", "hook_sd")
        assert (entry.targets is not None) == needs_teacher, name
        assert entry.teacher_sees == ("image" if name == "kd_inconsistent" else "view"), name
    assert kd.methods.METHODS["dkd"].weights == {"alpha": 1.0, "beta": 8.0, "T": 4.0, "warmup": 20,
                                                 "ce_weight": 1.0}


@pytest.mark.parametrize("method", sorted(kd.methods.METHODS))
def test_every_registered_step_returns_its_named_terms_on_a_tiny_batch(method):
    assert method in TERMS, f"no tiny setup for the new method {method!r}"
    student, teacher, targets, extra = _setup(method)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32, generator=g), torch.tensor([0, 1, 2, 3])
    t = None
    if targets is not None:
        with torch.no_grad():
            t = targets(teacher, x)
    if method in ("kd_unlabelled", "pseudo_label"):
        t["labelled"] = torch.tensor([True, False, True, False])
    out = kd.methods.METHODS[method].step(student, x, y, t)
    assert isinstance(out, dict) and list(out) == TERMS[method]
    assert all(v.dim() == 0 and torch.isfinite(v) for v in out.values())
    assert all(v.item() > 0 for v in out.values())   # every term says something at the start
    loss = kd.losses.total(out)
    loss.backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(gr).all() for gr in grads)
    assert sum(gr.abs().sum() for gr in grads) > 0
    if extra is not None:   # the training-only module (regressor, projection) learns too
        assert getattr(student, extra).weight.grad.abs().sum() > 0
    if teacher is not None:
        assert all(p.grad is None for p in teacher.parameters())


def test_a_short_dkd_run_records_its_three_terms_per_epoch(tiny, options):
    teacher = Teacher(kd.models.build("deepnn", seed=1), kd.methods.kd_targets)
    run, = kd.methods.train_seeds("dkd", tiny, seeds=[0], recipe=Recipe(epochs=2, batch_size=16),
                                  chapter="t", teacher=teacher, weights={"warmup": 2}, options=options)
    assert run.record["method"] == "dkd"
    dkd_weights = {"alpha": 1.0, "beta": 8.0, "T": 4.0, "warmup": 2, "ce_weight": 1.0}
    assert {k: run.record["params"][k] for k in dkd_weights} == dkd_weights   # beside the recipe's
    history = run.record["history"]
    assert len(history) == 2
    for row in history:
        assert set(row["loss_terms"]) == {"ce", "tckd", "nckd"}
        assert sum(row["loss_terms"].values()) == pytest.approx(row["train_loss"], rel=1e-5)
        assert all(v > 0 for v in row["loss_terms"].values())
