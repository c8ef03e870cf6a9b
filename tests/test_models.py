import pytest
import torch

from kdutils import methods, models


def test_parameter_counts_match_the_reference():
    assert models.count_params(models.DeepNN()) == 1_186_986
    assert models.count_params(models.LightNN()) == 267_738


def test_teacher_dropout_is_the_intended_0_1():
    drops = [m for m in models.DeepNN().modules() if isinstance(m, torch.nn.Dropout)]
    assert [d.p for d in drops] == [0.1] and not drops[0].inplace


@pytest.mark.parametrize("name,shape", [("deepnn", (2, 32, 8, 8)), ("lightnn", (2, 16, 8, 8))])
def test_forward_shapes_and_features(name, shape):
    m = models.build(name, seed=0).eval()
    x = torch.randn(2, 3, 32, 32)
    logits, h = m(x, return_features=True)
    assert logits.shape == (2, 10) and h.shape == shape
    assert torch.equal(m(x), logits)


def test_same_seed_same_weights_different_seed_different_weights():
    a, b, c = (models.build("lightnn", seed=s) for s in (3, 3, 4))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.features[0].weight, c.features[0].weight)


def test_build_does_not_touch_the_global_random_state():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    models.build("deepnn", seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_hint_student_starts_from_the_plain_students_weights():
    hint = methods.METHODS["hint"].wrap(models.build("lightnn", seed=7), 7)
    assert isinstance(hint, methods.HintStudent)
    plain = models.build("lightnn", seed=7)
    assert all(torch.equal(p, q) for p, q in zip(hint.student.parameters(), plain.parameters()))
    assert models.count_params(hint) - models.count_params(plain) == 16 * 32 * 9 + 32


def test_unknown_model_is_refused():
    with pytest.raises(ValueError, match="unknown model 'resnet9'"):
        models.build("resnet9")
