"""The torch-free catalogue that ``advseg models`` and ``advseg attacks`` read equals the live
registries exactly (names, help lines, attack options, defence parameters, parameter counts)."""

from __future__ import annotations

from advseg import catalogue


def test_catalogue_equals_the_registries():
    written, live = catalogue.load(), catalogue.collect()
    fix = "catalogue.json is stale: run `python -m advseg.catalogue` and commit it"
    assert written.models == live.models, fix
    assert written.attacks == live.attacks, fix
    assert written.losses == live.losses, fix
    assert written.defences == live.defences, fix
    assert written == live, fix
    assert [m.name for m in written.models] == sorted(m.name for m in written.models)
    assert {"unet", "unet-vgg13", "unet-tiny"} <= {m.name for m in written.models}


def test_the_protocol_default_is_the_summary_one():
    from advseg import summary

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
