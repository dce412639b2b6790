"""The torch-free catalogue that ``advseg models`` and ``advseg attacks`` read equals the live
registries exactly (names, help lines, attack options, defence parameters, parameter counts)."""

from __future__ import annotations

import pytest

from advseg import catalogue
from advseg.cli.catalogue import collect
from advseg.errors import UserError


def test_catalogue_equals_the_registries():
    written, live = catalogue.load(), collect()
    fix = "catalogue.json is stale: run `make catalogue` and commit it"
    assert written.models == live.models, fix
    assert written.attacks == live.attacks, fix
    assert written.losses == live.losses, fix
    assert written.defences == live.defences, fix
    assert written.corruptions == live.corruptions, fix
    assert written == live, fix
    assert [m.name for m in written.models] == sorted(m.name for m in written.models)
    assert {"unet", "unet-vgg13", "unet-tiny"} <= {m.name for m in written.models}


def test_the_protocol_default_is_the_summary_one():
    from advseg.stats import summary

    assert summary.DEFAULT_PROTOCOL == catalogue.DEFAULT_PROTOCOL in catalogue.PROTOCOLS


def test_write_then_load_round_trips(tmp_path, monkeypatch):
    written = catalogue.load()
    path = tmp_path / "catalogue.json"
    catalogue.write(written, path)
    assert path.read_text() == catalogue.PATH.read_text()  # the committed file is write()'s form
    monkeypatch.setattr(catalogue, "PATH", path)
    catalogue.load.cache_clear()
    try:
        assert catalogue.load() == written
    finally:
        catalogue.load.cache_clear()


def _registry_check(kind: str, name: str) -> None:
    from advseg.attacks import attack_options
    from advseg.defences import create_defence
    from advseg.losses import create_loss
    from advseg.models.zoo import resolve

    check = {"model": resolve, "attack": attack_options, "loss": create_loss}
    check["defence"] = create_defence
    check[kind](name)


@pytest.mark.parametrize(
    ("kind", "typo"),
    [("model", "unett"), ("attack", "pgdd"), ("loss", "bcee"), ("defence", "medain")],
)
def test_check_names_answers_as_the_registry_does(kind, typo):
    with pytest.raises(UserError) as fast:
        catalogue.check_names(kind, [None, typo], "--flag")
    with pytest.raises(UserError) as slow:
        _registry_check(kind, typo)
    assert str(fast.value) == f"--flag: {slow.value}"
    listed = catalogue.load()
    valid = {"model": listed.models[0].name, "attack": listed.attacks[0].name}
    valid["defence"] = listed.defences[0].name
    catalogue.check_names(kind, [valid.get(kind, listed.losses[0][0])], "--flag")


def test_check_names_leaves_open_names_to_the_library():
    catalogue.check_names("model", ["smp:FPN:resnet34", "unet"], "--model")
    catalogue.check_names("attack", ["pgd+bpda", "apgd+eot+bpda"], "--attack")
    catalogue.check_names("defence", ["none", "median:3", "jpeg:x"], "--defence")  # value: theirs


@pytest.mark.parametrize("typo", ["pgd+bpdx", "pgd+bpda+bpda"])
def test_an_adaptive_suffix_typo_answers_as_the_library_does(typo):
    from advseg.attacks import attack_options

    with pytest.raises(UserError) as fast:
        catalogue.check_names("attack", [typo], "--attack")
    with pytest.raises(UserError) as slow:
        attack_options(typo)
    assert str(fast.value) == f"--attack: {slow.value}"
