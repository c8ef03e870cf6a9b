"""The training loop: frozen teachers, resume, records, the teacher cache, and failures."""
import json
import pathlib
import pickle
import re
import time
from dataclasses import replace

import pytest
import torch

import kdutils as kd
from kdutils import book
from kdutils.checkpoint import CheckpointError, atomic_save, load_checkpoint, load_state_dict_strict
from kdutils.loop import Teacher, TrainingDiverged
from kdutils.settings import RunOptions
from kdutils.train import Recipe, fit

# the chapter each Part I method is trained in
CHAPTER = {"ce": "baseline", "kd": "hinton_kd", "cosine": "cosine_hidden_state",
           "hint": "intermediate_regressor"}



def _options(tmp_path, ckpt, results, **kw):
    return RunOptions(ckpt_dir=str(tmp_path / ckpt), results_dir=str(tmp_path / results),
                      progress=False, **kw)


@pytest.fixture
def dirs(tmp_path):
    return {"options": _options(tmp_path, "ckpt", "results")}


def _teacher(tiny, dirs):
    return book.teachers.get_teacher("deepnn", tiny, Recipe(epochs=2, batch_size=16), **dirs)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_frozen_teacher_gets_no_gradient_and_stays_in_eval_mode(tiny, dirs):
    teacher = _teacher(tiny, dirs).model
    before = _state(teacher)
    student = kd.models.build("lightnn", seed=1)
    s0 = _state(student)
    x = kd.data.normalize(tiny.train_x[:8], tiny.mean, tiny.std)
    loss = kd.losses.total(kd.methods.kd_step(student, x, tiny.train_y[:8], kd.methods.kd_targets(teacher, x)))
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(not p.requires_grad for p in teacher.parameters())
    assert student.features[0].weight.grad.abs().sum() > 0
    # through the loop, with the teacher run per step (teacher_outputs precomputed or not)
    run = fit(student, tiny, Recipe(epochs=1, batch_size=16, augment=True), chapter="t", method="kd",
              step=kd.methods.kd_step, teacher=Teacher(teacher, kd.methods.kd_targets), **dirs)
    assert not teacher.training
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    assert any(not torch.equal(v, run.model.state_dict()[k]) for k, v in s0.items())


def test_precomputed_teacher_outputs_give_the_same_run_as_per_step(tiny, dirs, tmp_path):
    teacher = _teacher(tiny, dirs)
    kw = dict(chapter="t", method="kd", step=kd.methods.kd_step,
              teacher=Teacher(teacher.model, kd.methods.kd_targets))
    a = fit(kd.models.build("lightnn", seed=2), tiny, Recipe(epochs=2, batch_size=16),
            options=_options(tmp_path, "a", "ra"), **kw)  # precomputed
    # per step: the same outputs, forced through the per-step path
    b_model = kd.models.build("lightnn", seed=2)
    kd.loop.freeze(teacher.model)
    train, test = kd.data.loaders(tiny, 16, seed=0)  # fit's layout on the CPU: NCHW
    opt = torch.optim.Adam(b_model.parameters(), 1e-3)
    for epoch in range(2):  # fit's seeding, then the public loop with the teacher run per batch
        torch.manual_seed(0 * 100_003 + epoch)
        train.set_epoch(epoch)
        batches = kd.loop.with_teacher(train, teacher.model, kd.methods.kd_targets)
        kd.loop.train_epoch(b_model, batches, kw["step"], opt)
    # The teacher's table is computed in batches of 500, the per-step outputs in batches of 16:
    # the convolutions may round differently (1.5e-6 after 2 epochs on a 2-core EPYC), while a
    # wrong table moves the weights by 1e-3 and more.
    for k, v in a.model.state_dict().items():
        assert torch.allclose(v, b_model.state_dict()[k], atol=1e-5), k


class Interrupt(Exception):
    pass


def _interrupting(step, at_call):
    calls = {"n": 0}

    @kd.fingerprint.watching(step)   # the same loss: the run's code fingerprint is unchanged
    def wrapped(*args):
        calls["n"] += 1
        if calls["n"] == at_call:
            raise Interrupt
        return step(*args)
    return wrapped


@pytest.mark.parametrize("method", ["ce", "kd", "hint"])
def test_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_one(tiny, tmp_path, method):
    teacher = _teacher(tiny, {"options": _options(tmp_path, "t", "t")})
    entry = kd.methods.METHODS[method]
    step = entry.step

    def make(seed):  # the student train_seeds builds: LightNN, in the method's wrapper if any
        net = kd.models.build("lightnn", seed=seed)
        return entry.wrap(net, seed) if entry.wrap is not None else net
    recipe = Recipe(epochs=3, batch_size=16, seed=5)
    kw = dict(chapter=CHAPTER[method], method=method,
              teacher=Teacher(teacher.model, entry.targets, key=teacher.record["run_key"])
              if entry.targets else None)
    full = fit(make(5), tiny, recipe, step=step, options=_options(tmp_path, "a", "ra"), **kw)
    # second run: killed in the middle of epoch 2 (4 steps per epoch), then started again
    b = dict(options=_options(tmp_path, "b", "rb"))
    with pytest.raises(Interrupt):
        fit(make(5), tiny, recipe, step=_interrupting(step, 6), **b, **kw)
    resumed = fit(make(5), tiny, recipe, step=step, **b, **kw)
    assert resumed.resumed_from_epoch == 1
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    assert [h["test_acc"] for h in full.record["history"]] == [h["test_acc"] for h in resumed.record["history"]]
    assert [h["train_loss"] for h in full.record["history"]] == [h["train_loss"] for h in resumed.record["history"]]


def test_run_record_holds_what_produced_the_number(tiny, dirs, tmp_path):
    run = fit(kd.models.build("lightnn", seed=0), tiny, Recipe(epochs=2, batch_size=32), chapter="baseline",
              method="ce", params={"note": 1}, options=replace(dirs["options"], profile="smoke"))
    rec = json.loads(run.record_path.read_text())
    for field in kd.results.REQUIRED:
        assert field in rec, field
    assert rec["data_source"] == "synthetic" and rec["epochs"] == 2 and len(rec["history"]) == 2
    assert rec["test_acc"] == rec["history"][-1]["test_acc"] and rec["params"]["note"] == 1
    assert rec["params"]["lr"] == 1e-3 and rec["device"].startswith("cpu")
    assert set(rec["history"][0]) == {"epoch", "train_loss", "test_acc", "lr", "loss_terms", "seconds"}
    assert rec["history"][0]["loss_terms"] == {"ce": pytest.approx(rec["history"][0]["train_loss"])}
    df = kd.results.load_records(dirs["options"].results_dir)
    assert list(df["method"]) == ["ce"]


def test_summaries_give_mean_and_std_over_seeds(tiny, dirs):
    runs = kd.methods.train_seeds("ce", tiny, seeds=[0, 1, 2], recipe=Recipe(epochs=1, batch_size=32),
                                  chapter="baseline", **dirs)
    table = kd.results.summarize(kd.results.load_records(dirs["options"].results_dir))
    accs = torch.tensor([r.test_acc for r in runs], dtype=torch.float64)
    assert table.loc[0, "seeds"] == 3
    assert table.loc[0, "acc_mean"] == pytest.approx(accs.mean().item())
    assert table.loc[0, "acc_std"] == pytest.approx(accs.std().item())


def test_teacher_is_trained_once_then_loaded(tiny, dirs):
    first = _teacher(tiny, dirs)
    second = _teacher(tiny, dirs)
    assert first.resumed_from_epoch == 0 and second.resumed_from_epoch == 2
    assert second.record["run_key"] == first.record["run_key"]
    assert all(torch.equal(v, second.model.state_dict()[k]) for k, v in first.model.state_dict().items())
    assert not second.model.training and not any(p.requires_grad for p in second.model.parameters())


def test_nan_loss_stops_with_epoch_step_and_lr_and_keeps_the_last_good_checkpoint(tiny, dirs):
    recipe = Recipe(epochs=2, batch_size=16)
    calls = {"n": 0}

    def step(model, x, y, t):
        calls["n"] += 1
        loss = kd.losses.total(kd.methods.ce_step(model, x, y, t))
        return loss * float("nan") if calls["n"] == 7 else loss  # epoch 2, step 3
    with pytest.raises(TrainingDiverged, match=r"epoch 2, step 3 \(learning rate 0.001\).*last good checkpoint"):
        fit(kd.models.build("lightnn", seed=0), tiny, recipe, chapter="t", method="nan", step=step, **dirs)
    ckpts = list((kd.settings.ckpt_dir(dirs["options"].ckpt_dir) / "t").glob("*.pt"))
    assert len(ckpts) == 1 and load_checkpoint(ckpts[0])["epoch"] == 1


def test_gpu_asked_for_where_none_exists():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(RuntimeError, match="'cuda' was asked for, but PyTorch sees no CUDA GPU"):
        kd.train.pick_device("cuda")


def test_unwritable_results_folder_is_refused_before_training(tiny, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(PermissionError, match="cannot write to .*a-file"):
        fit(kd.models.build("lightnn", seed=0), tiny, Recipe(epochs=1), chapter="t", method="ce",
            options=RunOptions(ckpt_dir=str(tmp_path / "c"), results_dir=str(blocker / "results"),
                               progress=False))
    assert not (tmp_path / "c" / "t").exists() or not list((tmp_path / "c" / "t").glob("*.pt"))


def test_checkpoint_of_another_architecture_names_keys_and_shapes():
    with pytest.raises(CheckpointError, match=r"shape mismatch: features.0.weight: checkpoint \(128, 3, 3, 3\)"):
        load_state_dict_strict(kd.models.LightNN(), kd.models.DeepNN().state_dict())


def test_truncated_checkpoint_is_reported_with_its_name(tmp_path):
    path = tmp_path / "run.pt"
    atomic_save({"w": torch.ones(1000)}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(CheckpointError, match=r"run.pt: it is truncated or corrupted.*Delete the file"):
        load_checkpoint(path)


class Payload:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_pickle_with_executable_payload_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"model": Payload()}, path)
    with pytest.raises(CheckpointError, match="refused for safety"):
        load_checkpoint(path)
    assert not (tmp_path / "PWNED").exists()
    with open(path, "rb"):
        pass
    assert pickle  # the payload is a real pickle: plain pickle.load would have run it


def test_missing_teacher_is_named_when_training_it_is_not_allowed(tiny, dirs):
    with pytest.raises(book.teachers.TeacherMissing, match=r"looked for .*teacher/deepnn-full-seed0-.*\.pt"):
        book.teachers.get_teacher("deepnn", tiny, Recipe(epochs=2, batch_size=16), train_if_missing=False, **dirs)
    _teacher(tiny, dirs)
    assert book.teachers.get_teacher("deepnn", tiny, Recipe(epochs=2, batch_size=16), train_if_missing=False,
                                   **dirs).resumed_from_epoch == 2


def test_unknown_method_and_missing_teacher_for_a_method(tiny, dirs):
    """train_seeds trains registered methods only (their step, targets and wrapper come from
    the registry); an unknown name is refused with the known ones, weights are checked
    against the step's, and a teacher must be given exactly when the method needs one."""
    one = dict(seeds=[0], recipe=Recipe(epochs=1), chapter="t", **dirs)
    known = ", ".join(kd.methods.METHODS)
    assert known.startswith("ce, kd, cosine, hint, dkd") and "feature_kd" in known
    with pytest.raises(ValueError, match=re.escape(f"unknown method 'mine'; known: {known}")):
        kd.methods.train_seeds("mine", tiny, **one)
    with pytest.raises(ValueError, match="method 'kd' needs a teacher"):
        kd.methods.train_seeds("kd", tiny, **one)
    with pytest.raises(ValueError, match=r"method 'kd' takes the weights \('T', 'alpha'\), not \['beta'\]"):
        kd.methods.train_seeds("kd", tiny, weights={"beta": 1.0}, **one)
    with pytest.raises(ValueError, match=r"method 'dkd' takes the weights \('alpha', 'beta', 'T', "
                                         r"'warmup', 'ce_weight'\), not \['progress'\]"):
        kd.methods.train_seeds("dkd", tiny, weights={"progress": 1}, **one)  # not a loss weight
    assert kd.methods.method_weights("dkd", {"beta": 2.0}) == {
        "alpha": 1.0, "beta": 2.0, "T": 4.0, "warmup": 20, "ce_weight": 1.0}
    # the old overrides for unregistered methods are gone: a step, targets or student maker
    # is not accepted beside a name, and the chapter must be given
    for override in ({"step": kd.methods.cosine_step}, {"targets": kd.methods.cosine_targets},
                     {"make": lambda s: kd.models.build("lightnn", seed=s)}):
        with pytest.raises(TypeError, match="unexpected keyword argument"):
            kd.methods.train_seeds("kd", tiny, **override, **one)
    with pytest.raises(TypeError, match="chapter"):
        kd.methods.train_seeds("ce", tiny, seeds=[0], recipe=Recipe(epochs=1), **dirs)
    teacher = _teacher(tiny, dirs)
    with pytest.raises(ValueError, match="method 'ce' takes no teacher"):
        kd.methods.train_seeds("ce", tiny, teacher=teacher, **one)
    with pytest.raises(ValueError, match="unknown method 'mine'"):
        kd.methods.train_seeds("mine", tiny, teacher=teacher, **one)
    trained = {p.parent.name for p in pathlib.Path(dirs["options"].results_dir).rglob("*.json")}
    assert trained == {"teacher"}  # no student was trained


def test_unwritable_checkpoint_folder_is_refused(tiny, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(PermissionError, match="cannot write to .*file/t"):
        fit(kd.models.build("lightnn", seed=0), tiny, Recipe(epochs=1), chapter="t", method="ce",
            options=RunOptions(ckpt_dir=str(blocker), results_dir=str(tmp_path / "r"), progress=False))


def test_precomputed_outputs_are_refused_when_the_recipe_augments(tiny, dirs):
    with pytest.raises(ValueError, match="the recipe augments"):
        fit(kd.models.build("lightnn", seed=0), tiny, Recipe(epochs=1, augment=True), chapter="t",
            method="kd", step=kd.methods.kd_step,
            teacher=Teacher(kd.models.build("lightnn", seed=1), kd.methods.kd_targets,
                            outputs={"logits": torch.zeros(64, 10)}), **dirs)


def test_fit_leaves_the_callers_random_state_alone(tiny, dirs):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    fit(kd.models.build("lightnn", seed=0), tiny, Recipe(epochs=1, batch_size=32), chapter="t", method="ce", **dirs)
    assert torch.equal(torch.rand(3), expected)


def test_a_reloaded_run_keeps_its_record_unless_another_training_wrote_it(tiny, dirs, capsys):
    """A finished run reloads with the record that says how it was made. A record of the same
    run key written by another training (copied from another machine, say) does not describe
    these weights: it is rewritten from the checkpoint's own epochs."""
    smoke = replace(dirs["options"], profile="smoke")
    train = lambda: fit(kd.models.build("lightnn", seed=0), tiny, Recipe(epochs=2, batch_size=32),  # noqa: E731
                        chapter="baseline", method="ce", options=smoke)
    first = train()
    written = first.record_path.read_text()
    assert train().record == first.record and first.record_path.read_text() == written
    other = json.loads(written)
    other["history"] = [{**h, "test_acc": h["test_acc"] + 7.0, "seconds": h["seconds"] * 3}
                        for h in other["history"]]
    other.update(test_acc=other["history"][-1]["test_acc"], wall_time_s=123.0)
    first.record_path.write_text(json.dumps(other))
    again = train()
    assert "described another training" in capsys.readouterr().out
    assert again.record["history"] == first.record["history"]
    assert again.record["test_acc"] == first.record["test_acc"] != other["test_acc"]
    assert json.loads(first.record_path.read_text())["wall_time_s"] == first.record["wall_time_s"]
    assert not kd.runs.same_training(other["history"], first.record["history"])
    assert not kd.runs.same_training(first.record["history"][:1], first.record["history"])
    assert not kd.runs.same_training(None, first.record["history"])


def test_summaries_can_group_by_any_record_field(tiny, dirs):
    kd.methods.train_seeds("ce", tiny, seeds=[0, 1], recipe=Recipe(epochs=1, batch_size=32),
                           chapter="baseline", **dirs)
    table = kd.results.summarize(kd.results.load_records(dirs["options"].results_dir),
                                 by=["chapter", "method", "profile", "data_source", "model"])
    assert table.loc[0, "seeds"] == 2 and table.loc[0, "data_source"] == "synthetic"


def test_to_frame_gives_the_records_that_load_records_reads(tiny, dirs):
    runs = kd.methods.train_seeds("ce", tiny, seeds=[0, 1], recipe=Recipe(epochs=1, batch_size=32),
                                  chapter="baseline", **dirs)
    a = kd.results.to_frame(runs)
    b = kd.results.load_records(dirs["options"].results_dir)
    assert list(a["run_key"]) == list(b["run_key"]) and list(a["test_acc"]) == list(b["test_acc"])


def test_named_loss_terms_train_like_their_sum_and_are_recorded_per_epoch(tiny, tmp_path):
    teacher = _teacher(tiny, {"options": _options(tmp_path, "t", "t")})
    kw = dict(chapter="t", method="kd", teacher=Teacher(teacher.model, kd.methods.kd_targets))
    recipe = Recipe(epochs=2, batch_size=16, seed=3)

    def summed(model, x, y, t):  # the same loss as one scalar
        return kd.losses.kd_loss(model(x), t["logits"], y, T=5.0, alpha=0.5)
    named = fit(kd.models.build("lightnn", seed=3), tiny, recipe, step=kd.methods.kd_step,
                options=_options(tmp_path, "a", "ra"), **kw)
    scalar = fit(kd.models.build("lightnn", seed=3), tiny, recipe, step=summed,
                 options=_options(tmp_path, "b", "rb"), **kw)
    assert all(torch.equal(v, scalar.model.state_dict()[k]) for k, v in named.model.state_dict().items())
    for row, other in zip(named.record["history"], scalar.record["history"]):
        assert set(row["loss_terms"]) == {"kd", "ce"} and "loss_terms" not in other
        assert row["train_loss"] == other["train_loss"]
        # the mean of a sum is the sum of the means, up to float rounding
        assert row["loss_terms"]["kd"] + row["loss_terms"]["ce"] == pytest.approx(row["train_loss"], rel=1e-5)
        assert row["loss_terms"]["kd"] > 0 and row["loss_terms"]["ce"] > 0


def test_seeds_share_one_teacher_pass_equal_to_each_runs_own(tiny, dirs, tmp_path, monkeypatch):
    """Without augmentation train_seeds runs the teacher once for all seeds, in the layout the
    runs use (channels_last here), and every run ends bitwise where it would with its own pass."""
    from functools import partial
    teacher = _teacher(tiny, dirs)
    passes = []
    real = kd.train.precompute_teacher
    monkeypatch.setattr(kd.train, "precompute_teacher", lambda *a, **k: passes.append(1) or real(*a, **k))
    speed, recipe = kd.speed.Speed(channels_last=True), Recipe(epochs=1, batch_size=32)
    shared = kd.methods.train_seeds("kd", tiny, seeds=[0, 1], recipe=recipe, chapter="hinton_kd",
                                    teacher=teacher, speed=speed, weights={"T": 2.0}, **dirs)
    assert len(passes) == 1
    apart = dict(options=_options(tmp_path, "own", "own"))
    for run in shared:
        seed = run.record["seed"]
        own = fit(kd.models.build("lightnn", seed=seed), tiny, replace(recipe, seed=seed), chapter="hinton_kd",
                  method="kd", step=partial(kd.methods.kd_step, T=2.0, alpha=0.5),
                  teacher=Teacher(teacher.model, kd.methods.kd_targets, key=teacher.record["run_key"]),
                  params={"T": 2.0, "alpha": 0.5}, speed=speed, **apart)
        assert own.record["run_key"] == run.record["run_key"]
        assert all(torch.equal(a, b) for a, b in zip(_state(run.model).values(), _state(own.model).values()))
    assert len(passes) == 3  # each own run computed its table
    again = kd.methods.train_seeds("kd", tiny, seeds=[0, 1], recipe=recipe, chapter="hinton_kd",
                                   teacher=teacher, speed=speed, weights={"T": 2.0}, **dirs)
    assert len(passes) == 3 and [r.resumed_from_epoch for r in again] == [1, 1]  # reloads need no pass


def test_the_shared_teacher_pass_is_timed_into_the_run_that_needed_it(tiny, dirs, monkeypatch):
    teacher = _teacher(tiny, dirs)
    real = kd.train.precompute_teacher
    monkeypatch.setattr(kd.train, "precompute_teacher", lambda *a, **k: (time.sleep(1.5), real(*a, **k))[1])
    runs = kd.methods.train_seeds("kd", tiny, seeds=[0, 1], recipe=Recipe(epochs=1, batch_size=32),
                                  chapter="hinton_kd", teacher=teacher, **dirs)
    extra = [load_checkpoint(r.checkpoint)["extra_s"] for r in runs]
    assert extra[0] >= 1.5 and extra[1] < 0.5
    for r, e in zip(runs, extra):
        assert r.record["wall_time_s"] >= sum(h["seconds"] for h in r.record["history"]) + e - 0.01
