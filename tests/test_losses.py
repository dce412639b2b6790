import pytest
import torch
from monai.losses import DiceFocalLoss, DiceLoss, FocalLoss

from advseg.errors import UserError
from advseg.losses import LOSSES, create_loss


@pytest.fixture
def batch():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, 8, 8, generator=gen)
    target = (torch.rand(4, 3, 8, 8, generator=gen) > 0.6).float()
    target[1] = 0  # a sample with no organ at all
    return logits, target


@pytest.mark.parametrize(
    ("name", "reference"),
    [
        ("bce", torch.nn.BCEWithLogitsLoss()),
        ("focal", FocalLoss(gamma=2.0, use_softmax=False)),
        ("dice", DiceLoss(sigmoid=True)),
        ("dicefocal", DiceFocalLoss(sigmoid=True, gamma=2.0)),
    ],
)
def test_mean_reduction_matches_reference_with_input_first(name, reference, batch):
    logits, target = batch
    ours = create_loss(name)(logits, target)
    torch.testing.assert_close(ours, reference(logits, target))
    # the notebook's swapped order gives another number: the order matters and is fixed
    assert not torch.isclose(ours, reference(target, logits))


@pytest.mark.parametrize("name", LOSSES.names())
def test_per_sample_values_average_to_the_mean(name, batch):
    logits, target = batch
    per_sample = create_loss(name, reduction="none")(logits, target)
    assert per_sample.shape == (4,)
    torch.testing.assert_close(per_sample.mean(), create_loss(name)(logits, target))
    torch.testing.assert_close(per_sample.sum(), create_loss(name, reduction="sum")(logits, target))


def test_ce_matches_torch_cross_entropy_on_indices(batch):
    logits, _ = batch
    labels = torch.randint(0, 3, (4, 8, 8))
    one_hot = torch.nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).float()
    expected = torch.nn.functional.cross_entropy(logits, labels)
    torch.testing.assert_close(create_loss("ce")(logits, one_hot), expected)
    torch.testing.assert_close(create_loss("ce")(logits, labels), expected)


def test_focal_gamma_zero_is_bce(batch):
    logits, target = batch
    torch.testing.assert_close(
        create_loss("focal", gamma=0.0)(logits, target), create_loss("bce")(logits, target)
    )


def test_custom_callable_and_bad_names():
    loss = create_loss(lambda logits, target: (logits - target).abs().flatten(1).mean(1))
    assert loss(torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)).item() == 1.0
    with pytest.raises(
        UserError,
        match=r"unknown loss 'bse'.*valid: balanced-bce, balanced-ce, bce, ce, cosine, dice, "
        "dicece, dicefocal",
    ):
        create_loss("bse")
    with pytest.raises(UserError, match="loss 'bce'"):
        create_loss("bce", gamma=2.0)
    with pytest.raises(UserError, match="reduction"):
        create_loss("bce", reduction="max")


def test_dicece_is_monai_dicece_on_a_softmax_partition():
    from monai.losses import DiceCELoss

    from advseg.labels import softmax_target

    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 4, 8, 8, generator=gen)  # background + 3 classes
    masks = (torch.rand(4, 3, 8, 8, generator=gen) > 0.6).float()
    target = softmax_target(masks)
    monai_loss = DiceCELoss(softmax=True, include_background=False, smooth_nr=1e-5, smooth_dr=1e-5)
    reference = monai_loss(logits, target)
    torch.testing.assert_close(create_loss("dicece")(logits, target), reference)
    indices = create_loss("dicece")(logits, target.argmax(1))  # indices give the same loss
    torch.testing.assert_close(indices, reference)
