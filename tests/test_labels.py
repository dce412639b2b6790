import pytest
import torch

from advseg.errors import UserError
from advseg.labels import (
    checkpoint_activation,
    class_prediction,
    output_channels,
    overlap_pixels,
    softmax_target,
)
from advseg.metrics import hard_prediction


def test_softmax_target_is_a_partition_where_the_first_class_wins():
    masks = torch.zeros(1, 3, 1, 4)
    masks[0, 0, 0, 1] = 1  # class 0 alone
    masks[0, 1, 0, 2] = masks[0, 2, 0, 2] = 1  # classes 1 and 2 overlap: 1 wins
    masks[0, 0, 0, 3] = masks[0, 2, 0, 3] = 1  # classes 0 and 2 overlap: 0 wins
    target = softmax_target(masks)
    assert target.shape == (1, 4, 1, 4)
    assert target.argmax(1).tolist() == [[[0, 1, 2, 1]]]  # background, then 1 + class
    assert (target.sum(1) == 1).all()
    assert overlap_pixels(masks) == 2


def test_class_prediction_drops_the_background_and_agrees_with_hard_prediction():
    logits = torch.tensor([[[[5.0, 0.0]], [[0.0, 1.0]], [[1.0, 3.0]]]])  # (1, 3, 1, 2)
    softmax = class_prediction(logits, "softmax")  # background wins pixel 0, class 1 pixel 1
    assert softmax.tolist() == [[[[False, False]], [[False, True]]]]
    sigmoid = torch.randn(2, 3, 4, 4)
    assert torch.equal(class_prediction(sigmoid, "sigmoid"), hard_prediction(sigmoid))
    assert torch.equal(class_prediction(sigmoid, "sigmoid", 0.7), sigmoid.sigmoid() > 0.7)


def test_output_channels_and_the_checkpoint_activation():
    assert output_channels(3, "sigmoid") == 3 and output_channels(3, "softmax") == 4
    assert checkpoint_activation(None, None, "old") == "sigmoid"  # before the field
    assert checkpoint_activation("softmax", "softmax", "ck") == "softmax"
    with pytest.raises(UserError, match=r"--activation sigmoid: ck was trained with softmax"):
        checkpoint_activation("softmax", "sigmoid", "ck")
    with pytest.raises(UserError, match="'tanh' is not sigmoid or softmax"):
        output_channels(3, "tanh")
