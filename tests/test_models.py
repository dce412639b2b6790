import pytest
import torch
from safetensors.torch import save_file

from advseg.errors import UserError
from advseg.models import MODELS, count_parameters, create_model, model_info, model_spec

# The paper's Table II "params" column (3 input channels, 3 classes), FACTS.md §2.
PAPER_PARAMS = {
    "unet-vgg13": 18.44e6,
    "unet-resnext101": 95.76e6,
    "unet-effb7": 67.10e6,
    "unetpp-effb7": 68.16e6,
}


@pytest.mark.parametrize(("name", "params"), PAPER_PARAMS.items())
def test_parameter_counts_equal_the_papers_column(name, params):
    info = model_info(name, in_channels=3, classes=3)
    assert round(info.params / 1e6, 2) == round(params / 1e6, 2)


def test_plain_unet_kernels_go_16_to_256():
    model = create_model("unet")
    widths = [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert min(widths[:-1]) == 16  # the last conv is the 3-class head
    assert max(widths) == 256
    assert count_parameters(model) == model_info("unet").params


def test_vgg_row_is_named_as_vgg13():
    assert "VGG13" in MODELS.help("unet-vgg13")
    assert model_info("unet-vgg16").params != model_info("unet-vgg13").params


@pytest.mark.parametrize("name", ["unet-tiny", "unet", "smp:Unet:resnet18"])
@pytest.mark.parametrize(("in_channels", "classes"), [(3, 3), (1, 2)])
def test_forward_shapes_and_spec(name, in_channels, classes):
    model = create_model(name, in_channels=in_channels, classes=classes).eval()
    with torch.no_grad():
        out = model(torch.rand(2, in_channels, 32, 32))
    assert out.shape == (2, classes, 32, 32)
    assert model_spec(model).name == name
    assert (model_spec(model).in_channels, model_spec(model).classes) == (in_channels, classes)


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("unet-vgg19", "valid: .*unet-tiny, unet-vgg13"),
        ("smp:Unet", "smp:<Arch>:<encoder>"),
        ("smp:NoSuchNet:resnet18", "valid: Unet"),
        ("smp:Unet:resnet9000", "unknown smp encoder"),
        ("smp:Unet:tu-resnet9000", "timm has no model"),
    ],
)
def test_unknown_names_list_the_valid_ones(name, fragment):
    with pytest.raises(UserError, match=fragment):
        create_model(name)


def test_local_encoder_weights_load_without_network(tmp_path):
    source = create_model("smp:Unet:resnet18")
    state = {f"encoder.{k}": v for k, v in source.encoder.state_dict().items()}
    state["fc.weight"] = torch.zeros(10, 512)  # a classifier head, as ImageNet files carry
    path = tmp_path / "resnet18.safetensors"
    save_file(state, str(path))

    model = create_model("smp:Unet:resnet18", encoder_weights=path)
    for key, value in source.encoder.state_dict().items():
        torch.testing.assert_close(model.encoder.state_dict()[key], value)

    grey = create_model("smp:Unet:resnet18", in_channels=1, encoder_weights=path)
    first = grey.encoder.conv1.weight
    assert first.shape[1] == 1
    # segmentation_models_pytorch folds RGB weights into one channel by summing them
    torch.testing.assert_close(first, source.encoder.conv1.weight.sum(1, keepdim=True))


def test_bad_encoder_weights_files(tmp_path):
    wrong = tmp_path / "wrong.safetensors"
    save_file({"conv1.weight": torch.zeros(1)}, str(wrong))
    with pytest.raises(UserError, match="does not match"):
        create_model("smp:Unet:resnet18", encoder_weights=wrong)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not safetensors at all")
    with pytest.raises(UserError, match="not a safetensors file"):
        create_model("smp:Unet:resnet18", encoder_weights=junk)
    with pytest.raises(UserError, match="no pretrained encoder"):
        create_model("unet", encoder_weights=wrong)
