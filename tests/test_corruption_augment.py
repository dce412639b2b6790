"""Corruptions as a training augmentation (issue 22): ``--augment corruptions``."""

import json
import re

import pytest
import torch

from advseg.augment import Augment, AugmentConfig, corruption_text
from advseg.corruptions import CORRUPTIONS, corrupt
from advseg.corruptions.augment import RandomCorruption, corruption_names
from advseg.errors import UserError
from advseg.train import TrainConfig

OFF = dict(p_affine=0.0, p_hflip=0.0, p_vflip=0.0, p_intensity=0.0, p_elastic=0.0)


def _image(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, 32, 32, generator=g)


def test_each_corrupted_image_is_a_corruption_of_the_registry_replayed_by_hand():
    """The augmentation's image is exactly ``corrupt`` with the draws it says it makes."""
    transform = RandomCorruption(["all"], p=1.0, severities=[2, 5])
    image = _image()
    for seed in range(6):
        torch.manual_seed(seed)
        out = transform(image)
        torch.manual_seed(seed)  # the same draws, by hand
        g = torch.Generator().manual_seed(int(torch.randint(2**31, ()).item()))
        assert float(torch.rand((), generator=g)) < 1.0
        name = transform.names[int(torch.randint(len(transform.names), (), generator=g))]
        severity = (2, 5)[int(torch.randint(2, (), generator=g))]
        expected = corrupt(image[None], name, severity, generator=g)[0]
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        assert not torch.equal(out, image)
        assert out.min() >= 0 and out.max() <= 1


def test_seeded_and_probability_p():
    transform = RandomCorruption(["noise", "blur"], p=0.3)
    image = _image()
    runs = []
    for seed in (4, 4, 5):
        torch.manual_seed(seed)
        runs.append(torch.stack([transform(image) for _ in range(40)]))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    changed = sum(not torch.equal(one, image) for one in runs[0])
    assert 4 <= changed <= 22  # Binomial(40, 0.3): mean 12
    torch.manual_seed(0)
    assert torch.equal(RandomCorruption(["noise"], p=0.0)(image), image)


def test_augment_applies_it_after_the_geometry_to_the_image_only():
    config = AugmentConfig(**{**OFF, "p_hflip": 1.0}, corruptions=["noise"], p_corruption=1.0)
    transform = RandomCorruption(config.corruptions, 1.0, config.corruption_severities)
    mask = torch.zeros(2, 32, 32)
    mask[0, 4:12, 3:20] = 1
    item = {"image": _image(), "mask": mask, "row": 1}
    torch.manual_seed(7)
    out = Augment(config, 32, image_transform=transform)(item)
    torch.testing.assert_close(out["mask"], mask.flip(-1))  # the mask: flipped, not corrupted
    plain = Augment(config, 32)
    torch.manual_seed(7)
    flipped = plain(item)["image"]  # the same MONAI draw ...
    assert torch.equal(flipped, item["image"].flip(-1))
    torch.manual_seed(7)
    torch.randint(2**31, ())  # ... which Augment's MONAI reseed takes first
    torch.testing.assert_close(out["image"], transform(flipped), rtol=0, atol=0)


def test_config_checks_and_expands_names():
    assert corruption_names(["noise", "all"]) == ["noise"] + [
        n for n in CORRUPTIONS.names() if n != "noise"
    ]
    config = TrainConfig(model="unet-tiny", augment=AugmentConfig(corruptions=["all"]))
    assert config.augment.corruptions == CORRUPTIONS.names()
    with pytest.raises(
        UserError, match=re.escape("augment.corruptions: unknown corruption 'motoin'")
    ):
        TrainConfig(model="unet-tiny", augment=AugmentConfig(corruptions=["motoin"]))
    with pytest.raises(
        UserError, match=re.escape("augment.corruption_severities: severity must be")
    ):
        TrainConfig(
            model="unet-tiny",
            augment=AugmentConfig(corruptions=["noise"], corruption_severities=[0]),
        )
    with pytest.raises(UserError, match=re.escape("augment.p_corruption")):
        AugmentConfig(corruptions=["noise"], p_corruption=1.5)
    with pytest.raises(UserError, match=re.escape("augment.enabled false")):
        AugmentConfig(corruptions=["noise"], enabled=False)
    text = corruption_text({"corruptions": ["noise", "blur"], "p_corruption": 0.5})
    assert text == "corruptions p 0.5 at severities 1-5 (noise, blur)"
    assert corruption_text(AugmentConfig()) == ""


def test_train_augment_corruptions_records_it_and_the_report_says_so(tmp_path, capsys):
    from advseg.cli import main
    from advseg.data import write_synthetic
    from advseg.models import load_checkpoint
    from advseg.report.training import training_facts

    data = tmp_path / "data"
    write_synthetic(data, cases=3, scans=1, slices=4)
    args = ["train", "--data", str(data), "--model", "unet-tiny", "--size", "32", "--epochs", "1"]
    args += ["--batch-size", "4", "--test-fraction", "0.34", "--val-fraction", "0.5"]
    runs = {}
    for name, extra in (("a", []), ("b", []), ("c", ["--seed", "1"]), ("plain", None)):
        out = tmp_path / name
        options = ["--augment", "corruptions", *extra] if extra is not None else []
        with pytest.raises(SystemExit) as code:
            main([*args, "--out", str(out), *options])
        assert code.value.code == 0
        assert ("corruption augmentation" in capsys.readouterr().out) == (extra is not None)
        runs[name] = load_checkpoint(out / "checkpoints" / "last")
    model, meta = runs["a"]
    assert meta.train["augment"]["corruptions"] == CORRUPTIONS.names()
    assert meta.train["augment"]["p_corruption"] == 0.5 and meta.train["augment"]["enabled"]
    same = [torch.equal(v, runs["b"][0].state_dict()[k]) for k, v in model.state_dict().items()]
    assert all(same)  # seeded: the same run twice, the same weights
    other = [torch.equal(v, runs["c"][0].state_dict()[k]) for k, v in model.state_dict().items()]
    assert not all(other)
    plain = [
        torch.equal(v, runs["plain"][0].state_dict()[k]) for k, v in model.state_dict().items()
    ]
    assert not all(plain)  # the corruptions changed the training
    facts = training_facts(tmp_path / "a" / "checkpoints" / "last")
    assert facts["corruptions"].startswith("corruptions p 0.5 at severities 1-5 (anisotropy, ")
    assert facts["label"] == facts["corruptions"]
    assert runs["plain"][1].train["augment"]["corruptions"] == []
    document = json.loads((tmp_path / "a" / "checkpoints" / "last.json").read_text())
    assert document["meta"]["train"]["augment"]["corruption_severities"] == [1, 2, 3, 4, 5]


def test_augment_option_is_checked(tmp_path, capsys):
    from advseg.cli import main

    args = ["train", "--data", "synthetic", "--out", str(tmp_path / "run")]
    for extra, said in (
        (["--augment", "corrupt"], "--augment: 'corrupt' is not one of default, corruptions"),
        (["--augment", "corruptions", "--no-augment"], "--no-augment: contradicts --augment"),
    ):
        with pytest.raises(SystemExit) as code:
            main([*args, "--cache-dir", str(tmp_path / "cache"), *extra])
        assert code.value.code == 2
        assert capsys.readouterr().err.startswith(f"error: {said}")
    assert not (tmp_path / "run").exists()
