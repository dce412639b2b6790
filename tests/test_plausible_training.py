"""Adversarial training with the plausible attacks (``--adv-train biasfield|elastic|gamma``,
AdvBias / AdvChain's adversarial data augmentation): the training loss is the loss on the
registry attack's images (and, for elastic, on the masks warped by the same field)."""

from __future__ import annotations

import math

import pytest
import torch

from advseg.attacks import create_attack, frozen
from advseg.defences import AdversarialConfig, AdversarialTraining, describe
from advseg.errors import UserError
from advseg.losses import create_loss
from advseg.models import create_model
from test_adversarial_training import _batch  # tests/ is on sys.path

BOUNDS = {"biasfield": 0.3, "elastic": 2.0, "gamma": 0.3}


@pytest.mark.parametrize("method", sorted(BOUNDS))
def test_the_training_loss_is_the_loss_on_the_registry_attacks_images(method):
    torch.manual_seed(0)
    model = create_model("unet-tiny", in_channels=3, classes=2).eval()
    x, y = _batch()
    eps = BOUNDS[method]
    config = AdversarialConfig(method=method, eps=eps, steps=3)
    defence = AdversarialTraining(config, model, create_loss("dicefocal"), train_loss="dicefocal")
    loss = defence.loss(model, x, y, epoch=1, step=0, steps=1)

    reference = create_attack(method, model, "dicefocal", eps, steps=3, alpha=2.5 * eps / 3)
    generator = torch.Generator().manual_seed(defence._step_seed(1, 0))
    with frozen(model), torch.enable_grad():
        x_adv = reference.perturb(x, y, generator)
    truth = reference.adversarial_truth(y)
    expected = create_loss("dicefocal")(model(x_adv).float(), truth)
    torch.testing.assert_close(loss, expected)
    assert not torch.equal(x_adv, x)
    if method == "elastic":  # the masks moved with the anatomy, nearest-neighbour
        assert not torch.equal(truth, y) and set(truth.unique().tolist()) <= {0.0, 1.0}
        assert reference.theta.abs().max() <= eps + 1e-6
    else:
        assert truth is y
    if method == "biasfield":  # the gain exp(f) stays in exp(+-eps) where the image is > 0
        inside = x > 0.05
        ratio = x_adv[inside] / x[inside]
        assert ratio.max() <= math.exp(eps) * 1.0001 and ratio.min() >= math.exp(-eps) * 0.9999
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_budgets_in_their_own_terms_and_what_is_refused():
    config = AdversarialConfig(method="elastic", eps=3.0)  # pixels: above 1 is fine
    assert describe(config).startswith("elastic eps 3, 10 steps of 0.75")
    with pytest.raises(UserError, match=r"exceeds the valid range.s width"):
        AdversarialConfig(method="pgd", eps=3.0)  # an L-inf eps stays within the range
    with pytest.raises(UserError, match="select_by: robust validation attacks with pgd"):
        AdversarialConfig(method="biasfield", eps=0.3, select_by="robust")


def test_train_cli_adv_train_biasfield_records_it(tmp_path, capsys):
    from advseg.cli import main
    from advseg.data import write_synthetic
    from advseg.models import load_checkpoint
    from advseg.report.training import training_facts

    data = tmp_path / "data"
    write_synthetic(data, cases=3, scans=1, slices=4)
    args = ["train", "--data", str(data), "--model", "unet-tiny", "--size", "32", "--epochs", "1"]
    args += ["--batch-size", "4", "--test-fraction", "0.34", "--val-fraction", "0.5"]
    args += ["--out", str(tmp_path / "run"), "--adv-train", "biasfield", "--adv-eps", "0.4"]
    with pytest.raises(SystemExit) as code:
        main([*args, "--adv-steps", "2"])
    assert code.value.code == 0
    assert "biasfield eps 0.4, 2 steps of 0.5" in capsys.readouterr().out
    _, meta = load_checkpoint(tmp_path / "run" / "checkpoints" / "last")
    assert meta.train["adversarial"]["method"] == "biasfield"
    facts = training_facts(tmp_path / "run" / "checkpoints" / "last")
    assert facts["label"].startswith("biasfield eps 0.4,") and "/255" not in facts["label"]


def test_a_sea_style_ensemble_of_bias_fields_keeps_the_worst_member_per_slice():
    """SEA over biasfield members: per slice, the image of the member with the lowest Dice,
    each member the registry attack itself (run here by hand with the same generator)."""
    from advseg.attacks.metric import sample_dice
    from advseg.attacks.sea import SEA

    torch.manual_seed(0)
    model = create_model("unet-tiny", in_channels=3, classes=2).eval()
    x, y = _batch(4)
    members = ["biasfield-bce", "biasfield-dice"]
    sea = SEA(model, eps=0.3, members=members, steps=3, skip_broken=False)
    x_sea = sea(x, y, generator=torch.Generator().manual_seed(5))

    generator = torch.Generator().manual_seed(5)
    images, scores = [], []
    for loss in ("bce", "dice"):
        member = create_attack("biasfield", model, loss, 0.3, steps=3)
        with frozen(model), torch.enable_grad():
            image = member.perturb(x, y, generator)
        images.append(image)
        with torch.no_grad():
            scores.append(sample_dice(model(image).float(), y, "sigmoid"))
    with torch.no_grad():
        clean = sample_dice(model(x).float(), y, "sigmoid")
    for i in range(len(x)):
        best = min(range(2), key=lambda m: (scores[m][i].item(), m))
        if scores[best][i] < clean[i]:
            torch.testing.assert_close(x_sea[i], images[best][i])
            assert sea.winners[i] == members[best]
        else:
            torch.testing.assert_close(x_sea[i], x[i])
    inside = x > 0.05
    ratio = x_sea[inside] / x[inside]
    assert ratio.max() <= math.exp(0.3) * 1.0001 and ratio.min() >= math.exp(-0.3) * 0.9999
    with pytest.raises(UserError, match="mix budgets"):
        SEA(model, eps=0.3, members=["biasfield-bce", "masked-bce"])
    with pytest.raises(UserError, match="mix budgets"):
        SEA(model, eps=0.3, members=["biasfield-bce", "gamma-bce"])
    with pytest.raises(UserError, match="member 'elastic-bce'"):
        SEA(model, eps=0.3, members=["elastic-bce"])
