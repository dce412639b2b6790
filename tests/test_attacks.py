import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from advseg.attacks import ATTACKS, attack_options, create_attack, frozen
from advseg.attacks.cospgd import cosine_to_label
from advseg.attacks.minimal import MinimalNorm
from advseg.attacks.segpgd import agrees, scale_gradient
from advseg.errors import UserError
from advseg.losses import create_loss
from tiny_models import blobs, fit, tiny_net  # tests/ is on sys.path

NAMES = ATTACKS.names()
PIXEL_NAMES = [name for name in NAMES if ATTACKS.get(name).pixel_budget]
"""The attacks whose eps bounds pixels; the plausible ones (biasfield, elastic, gamma) keep
budgets of their own, tested in tests/test_plausible_attacks.py."""
FIXED_BUDGET = [n for n in PIXEL_NAMES if not issubclass(ATTACKS.get(n), MinimalNorm)]
"""The pixel-budget attacks that spend their budget; the minimal-norm ones (alma-prox, pdpgd)
look for the smallest perturbation instead (tests/test_minimal_norm.py)."""
PAPER_LOSSES = ["bce", "focal", "dicefocal"]


@pytest.fixture(scope="module")
def trained():
    """A tiny net trained a few dozen steps on blobs (seconds), and a held-out batch."""
    model = fit(tiny_net(), *blobs(64, seed=1), steps=60)
    xt, yt = blobs(8, seed=2)
    with torch.no_grad():
        assert ((model(xt) > 0) == (yt > 0.5)).float().mean() > 0.9  # it really learned
    return model, xt, yt


def _args(name: str, norm: str = "linf") -> dict:
    options = attack_options(name)
    kw = {"norm": norm}
    if "steps" in options:
        kw["steps"] = 4 if name == "sea" else 3  # sea: one step per member at least
    return kw


# ---------------------------------------------------------------- properties on random inputs


@settings(max_examples=12, deadline=None)
@given(
    name=st.sampled_from(PIXEL_NAMES),
    norm=st.sampled_from(["linf", "l2"]),
    eps=st.floats(0.0, 1.0),
    batch=st.integers(1, 3),
    size=st.integers(4, 10),
    seed=st.integers(0, 2**16),
)
def test_budget_and_valid_range_hold(name, norm, eps, batch, size, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, size, size, generator=g)
    y = (torch.rand(batch, 3, size, size, generator=g) > 0.5).float()
    attack = create_attack(name, tiny_net(seed=seed % 7), "bce", eps, **_args(name, norm))
    x_adv = attack(x, y)
    assert x_adv.shape == x.shape
    if eps == 0:
        assert torch.equal(x_adv, x)
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    delta = (x_adv - x).flatten(1)
    if norm == "linf":
        assert delta.abs().max() <= eps + 1e-6
    else:
        assert (delta.norm(dim=1) <= eps * (1 + 1e-5) + 1e-6).all()


@settings(max_examples=8, deadline=None)
@given(
    name=st.sampled_from(PIXEL_NAMES),
    low=st.floats(-2.0, 0.0),
    width=st.floats(0.5, 3.0),
    seed=st.integers(0, 2**16),
)
def test_other_valid_ranges_are_kept(name, low, width, seed):
    g = torch.Generator().manual_seed(seed)
    x = low + width * torch.rand(2, 3, 6, 6, generator=g)
    y = (torch.rand(2, 3, 6, 6, generator=g) > 0.5).float()
    kw = _args(name) | {"valid_range": (low, low + width)}
    x_adv = create_attack(name, tiny_net(), "bce", width / 4, **kw)(x, y)
    bounds = torch.tensor([low, low + width], dtype=x.dtype)  # the range as float32 holds it
    assert x_adv.min() >= bounds[0] and x_adv.max() <= bounds[1]
    assert (x_adv - x).abs().max() <= width / 4 + 1e-6


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("loss", ["bce", "dice", "ce"])
def test_eps_zero_changes_nothing(name, loss):
    x, y = blobs(2, size=8)
    assert torch.equal(create_attack(name, tiny_net(), loss, 0.0, **_args(name))(x, y), x)


# ------------------------------------------------------- the loss goes up on a trained model


@pytest.mark.parametrize("name", FIXED_BUDGET)
@pytest.mark.parametrize("loss", [*PAPER_LOSSES, "dice"])
def test_untargeted_attack_raises_the_loss(trained, name, loss):
    model, x, y = trained
    per_sample = create_loss(loss, reduction="none")
    x_adv = create_attack(name, model, loss, 0.05, **_args(name))(x, y)
    with torch.no_grad():
        before, after = per_sample(model(x), y), per_sample(model(x_adv), y)
    assert after.mean() > 1.5 * before.mean()
    assert (after > before).float().mean() >= 0.75


@pytest.mark.parametrize("name", FIXED_BUDGET)
def test_targeted_attack_makes_an_organ_vanish(trained, name):
    model, x, y = trained
    target = y.clone()
    target[:, 2] = 0  # erase the stomach-like class
    bce = create_loss("bce", reduction="none")
    x_adv = create_attack(name, model, "bce", 0.1, targeted=True, **_args(name))(x, target)
    with torch.no_grad():
        logits_clean, logits_adv = model(x), model(x_adv)
    assert bce(logits_adv, target).mean() < bce(logits_clean, target).mean()
    on_clean = (logits_clean[:, 2] > 0).sum()
    assert (logits_adv[:, 2] > 0).sum() < on_clean  # the organ shrinks (it is bright: 0.6)


def test_l2_pgd_raises_the_loss(trained):
    model, x, y = trained
    bce = create_loss("bce", reduction="none")
    x_adv = create_attack("pgd", model, "bce", 1.0, norm="l2", steps=5)(x, y)
    with torch.no_grad():
        assert bce(model(x_adv), y).mean() > bce(model(x), y).mean()


def test_restarts_keep_the_worst_case_per_sample(trained):
    model, x, y = trained
    bce = create_loss("bce", reduction="none")
    one = create_attack("pgd", model, "bce", 0.03, steps=2, restarts=1, seed=3)(x, y)
    three = create_attack("pgd", model, "bce", 0.03, steps=2, restarts=3, seed=3)(x, y)
    with torch.no_grad():
        assert (bce(model(three), y) >= bce(model(one), y)).all()
    assert not torch.equal(one, three)  # some sample found a worse case in a later restart


# ---------------------------------------------------------------------- model state and RNG


@pytest.mark.parametrize("name", NAMES)
def test_model_state_is_restored_and_parameters_get_no_gradient(name):
    model = tiny_net()
    model.train()
    model[0].weight.requires_grad_(False)  # a partly frozen model stays partly frozen
    model[1].eval()  # and a submodule in eval stays in eval
    flags = [p.requires_grad for p in model.parameters()]
    x, y = blobs(2, size=8)
    seen = []
    model.register_forward_hook(lambda m, i, o: seen.append((m.training, any_grad(m))))
    create_attack(name, model, "bce", 0.03, **_args(name))(x, y)
    assert seen and all(not training and not grad for training, grad in seen)
    assert model.training and not model[1].training
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())


def any_grad(model: nn.Module) -> bool:
    return any(p.requires_grad for p in model.parameters())


def test_frozen_restores_state_after_an_error():
    model = tiny_net().train()
    with pytest.raises(RuntimeError), frozen(model):
        raise RuntimeError
    assert model.training and all(p.requires_grad for p in model.parameters())


def test_random_start_uses_its_own_generator_not_the_global_one():
    x, y = blobs(2, size=8)
    attack = create_attack("pgd", tiny_net(), "bce", 0.05, steps=1)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    first = attack(x, y)
    assert torch.equal(torch.get_rng_state(), state)  # global generator untouched
    torch.manual_seed(123)
    assert torch.equal(attack(x, y), first)  # same seed, same result, whatever the global seed
    other = create_attack("pgd", tiny_net(), "bce", 0.05, steps=1, seed=1)(x, y)
    assert not torch.equal(other, first)


# ------------------------------------------------------------------------ attack specifics


def test_fgsm_is_equation_5():
    model = tiny_net()
    x, y = blobs(2, size=8)
    xg = x.clone().requires_grad_(True)
    create_loss("bce")(model.eval()(xg), y).backward()
    expected = (x + 0.02 * xg.grad.sign()).clamp(0, 1)
    assert torch.allclose(create_attack("fgsm", model, "bce", 0.02)(x, y), expected)


def test_fgsm_notebook_blend_is_only_an_option_and_breaks_the_budget():
    model = tiny_net()
    x, y = blobs(2, size=8)
    sign = create_attack("fgsm", model, "bce", 0.05)(x, y)
    blend = create_attack("fgsm", model, "bce", 0.05, update="notebook")(x, y)
    direction = torch.sign(sign - x)  # where the sign update moved (clipped pixels excepted)
    assert torch.allclose(blend, (0.95 * x + 0.05 * direction).clamp(0, 1), atol=1e-6)
    assert (blend - x).abs().max() > 0.05  # the notebook's change exceeds eps on bright pixels
    with pytest.raises(UserError, match="norm 'linf'"):
        create_attack("fgsm", model, "bce", 0.05, update="notebook", norm="l2")


def test_segpgd_weights_shift_from_right_to_wrong_pixels():
    logits = torch.tensor([[[[2.0, -2.0]]]])  # (1, 1, 1, 2): predicts 1, 0
    y = torch.tensor([[[[1.0, 1.0]]]])  # first right, second wrong
    assert agrees(logits, y, "sigmoid").tolist() == [[[[True, False]]]]
    weighted = scale_gradient(logits.requires_grad_(True), torch.tensor([[[[0.25, 0.75]]]]))
    assert torch.equal(weighted, logits)  # same value
    weighted.sum().backward()
    assert logits.grad.tolist() == [[[[0.25, 0.75]]]]  # gradient scaled per element
    softmax_logits = torch.tensor([[[[3.0]], [[0.0]]]])  # (1, 2, 1, 1): class 0
    assert agrees(softmax_logits, torch.tensor([[[0]]]), "softmax").item()
    assert not agrees(softmax_logits, torch.tensor([[[[0.0]], [[1.0]]]]), "softmax").item()


def test_cospgd_sigmoid_cosine_is_the_two_way_softmax_cosine():
    logits = torch.randn(2, 3, 4, 4)
    y = (torch.rand(2, 3, 4, 4) > 0.5).float()
    p = torch.sigmoid(logits)
    two_way = torch.nn.functional.cosine_similarity(
        torch.stack([p, 1 - p]), torch.stack([y, 1 - y]), dim=0
    )
    assert torch.allclose(cosine_to_label(logits, y, "sigmoid"), two_way, atol=1e-6)
    one_hot = torch.nn.functional.one_hot(y.argmax(1), 3).permute(0, 3, 1, 2)
    assert torch.allclose(
        cosine_to_label(logits, y.argmax(1), "softmax"),
        cosine_to_label(logits, one_hot, "softmax"),
    )


@pytest.mark.parametrize("name", ["segpgd", "cospgd", "pgd"])
def test_softmax_models_with_cross_entropy(name):
    model = tiny_net()
    x, y = blobs(2, size=8)
    labels = y.argmax(1)  # (B, H, W) indices
    attack = create_attack(name, model, "ce", 0.05, steps=3)
    assert attack.activation == "softmax"
    ce = create_loss("ce", reduction="none")
    with torch.no_grad():
        assert ce(model(attack(x, labels)), labels).mean() > ce(model(x), labels).mean()


def test_any_callable_loss_and_dict_outputs():
    class DictNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = tiny_net()

        def forward(self, x):
            return {"out": self.net(x)}

    def stomach_only(logits, target):
        return logits[:, 2].flatten(1).mean(1)  # (B,): push the stomach logits up

    x, y = blobs(2, size=8)
    model = DictNet()
    x_adv = create_attack("bim", model, stomach_only, 0.05, steps=3)(x, y)
    with torch.no_grad():
        assert model(x_adv)["out"][:, 2].mean() > model(x)["out"][:, 2].mean()


# ------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("eps", [-0.1, float("nan"), float("inf"), 1.5, "big"])
def test_bad_eps_is_a_user_error(eps):
    with pytest.raises(UserError, match="eps"):
        create_attack("fgsm", tiny_net(), "bce", eps)


def test_unknown_names_are_answered_with_the_valid_ones():
    with pytest.raises(
        UserError, match=r"unknown attack 'pgf'.*did you mean 'pgd'.*valid: alma-prox, apgd, asma"
    ):
        create_attack("pgf", tiny_net())
    with pytest.raises(
        UserError, match=r"unknown loss 'bec'.*valid: balanced-bce, balanced-ce, bce, ce"
    ):
        create_attack("fgsm", tiny_net(), "bec")
    with pytest.raises(UserError, match=r"unknown option.*stpes; valid: steps, alpha"):
        create_attack("pgd", tiny_net(), "bce", stpes=3)
    with pytest.raises(UserError, match="norm 'l1'"):
        create_attack("pgd", tiny_net(), norm="l1")
    with pytest.raises(UserError, match="steps must be"):
        create_attack("bim", tiny_net(), steps=0)
    with pytest.raises(UserError, match="restarts must be"):
        create_attack("pgd", tiny_net(), restarts=0)
