"""Where the data and its cache are: named data only, resolved locations, a cache outside it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from advseg.data import DataConfig, PreprocessConfig, cache_root, load_data, resolved_config
from advseg.data.location import data_argument, run_locations
from advseg.data.record import first_line
from advseg.errors import UserError
from data_corpus import copy_of, first_png, tiny_synthetic


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return tiny_synthetic(tmp_path_factory.mktemp("location"), cases=2, scans=1, slices=3)


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its size and mtime: what a load must leave as it was."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def test_no_data_named_is_refused_saying_what_to_pass():
    with pytest.raises(UserError, match=r"--data PATH .* --data synthetic") as err:
        load_data(DataConfig(preprocess=PreprocessConfig(size=16)))
    assert "\n" not in str(err.value)


def test_cache_root_order_option_env_xdg_home(tmp_path, monkeypatch):
    monkeypatch.setenv("ADVSEG_CACHE", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root(tmp_path / "given") == tmp_path / "given"
    assert cache_root() == tmp_path / "env"
    monkeypatch.delenv("ADVSEG_CACHE")
    assert cache_root() == tmp_path / "xdg" / "advseg"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative")  # not absolute: ignored, as the spec says
    assert cache_root() == tmp_path / "home" / ".cache" / "advseg"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root() == tmp_path / "home" / ".cache" / "advseg"


def test_one_data_set_spelt_three_ways_has_one_cache_entry(synth, tmp_path, monkeypatch):
    root = copy_of(synth, tmp_path / "mri")
    cache = tmp_path / "cache"
    monkeypatch.chdir(tmp_path)
    spellings = ["mri", str(root), "mri/../mri"]
    loads = [load_data(DataConfig(path=p, cache_dir=cache, preprocess=PreprocessConfig(size=16)))
             for p in spellings]  # fmt: skip
    assert [d.decoded for d in loads] == [6, 0, 0]
    assert len({d.cache_path for d in loads}) == 1 and len(list(cache.iterdir())) == 1
    assert {d.location for d in loads} == {str(root.resolve())}
    assert all(Path(p).is_absolute() for p in loads[0].index["image_path"])


def test_an_image_file_rewritten_is_a_new_key(synth, tmp_path):
    """The key follows the files' content (issue 25): other pixels with the size and mtime kept
    are a new key; the same bytes with a new time are not."""
    import cv2

    root = copy_of(synth, tmp_path / "d")
    config = DataConfig(path=root, cache_dir=tmp_path / "c", preprocess=PreprocessConfig(size=16))
    png = first_png(root)
    pixels = cv2.imread(str(png), cv2.IMREAD_UNCHANGED)
    stored = [cv2.IMWRITE_PNG_COMPRESSION, 0]  # uncompressed: the size follows the shape only
    png.write_bytes(cv2.imencode(".png", pixels, stored)[1].tobytes())
    first = load_data(config)
    stat = png.stat()
    os.utime(png, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # same bytes, a new time
    touched = load_data(config)
    assert touched.cache_path == first.cache_path and touched.decoded == 0
    stat = png.stat()
    pixels[0, 0] = pixels[0, 0] + 1
    png.write_bytes(cv2.imencode(".png", pixels, stored)[1].tobytes())
    os.utime(png, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # size and mtime as before
    assert png.stat().st_size == stat.st_size and png.stat().st_mtime_ns == stat.st_mtime_ns
    second = load_data(config)
    assert second.cache_path != first.cache_path and second.decoded == 6


def test_the_cache_goes_to_advseg_cache_and_nothing_into_the_data(synth, tmp_path, monkeypatch):
    root = copy_of(synth, tmp_path / "d")
    monkeypatch.setenv("ADVSEG_CACHE", str(tmp_path / "env-cache"))
    before = _tree(root)
    data = load_data(DataConfig(path=root, preprocess=PreprocessConfig(size=16)))
    assert data.cache_path.parent == tmp_path / "env-cache"
    assert _tree(root) == before  # not a file added, removed or touched in the data directory


def test_a_read_only_data_set_loads(synth, tmp_path, monkeypatch):
    root = copy_of(synth, tmp_path / "ro")
    monkeypatch.setenv("ADVSEG_CACHE", str(tmp_path / "c"))  # the default place: none given
    folders = [root, *(p for p in root.rglob("*") if p.is_dir())]
    for folder in folders:
        folder.chmod(0o555)
    try:
        try:
            (root / "probe").touch()
        except PermissionError:
            pass
        else:  # root (with CAP_DAC_OVERRIDE) writes anywhere: the dir cannot be made read-only
            pytest.skip("this user writes into read-only directories (root)")
        config = DataConfig(path=root, preprocess=PreprocessConfig(size=16))
        assert load_data(config).decoded == 6 and load_data(config).decoded == 0
        assert len(list((tmp_path / "c").iterdir())) == 1
    finally:
        for folder in folders:
            folder.chmod(0o755)


def test_data_arguments_and_resolved_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert data_argument(None) is None
    assert data_argument("synthetic") == Path("synthetic")  # the phantom, by name
    assert data_argument("./synthetic") == tmp_path / "synthetic"  # a directory so called
    assert data_argument("mri") == tmp_path / "mri"
    config = resolved_config(
        DataConfig(path=Path("mri"), nifti_labels_file=Path("l.json"), cache_dir=Path("c"))
    )
    assert (config.path, config.nifti_labels_file, config.cache_dir) == (
        tmp_path / "mri", tmp_path / "l.json", tmp_path / "c"
    )  # fmt: skip
    assert resolved_config(DataConfig(path=Path("synthetic"))).path == Path("synthetic")
    line = first_line(DataConfig(path=Path("synthetic"), cache_dir=tmp_path / "c"))
    assert line.startswith("data: the synthetic phantom (generated images, not patient data)")
    assert str(tmp_path / "c" / "synthetic") in line


def test_run_locations_from_data_json_or_config_yaml(tmp_path):
    assert run_locations(tmp_path) == []
    (tmp_path / "config.yaml").write_text("data:\n  path: null\n")  # before --data was needed
    assert run_locations(tmp_path) == ["synthetic"]
    (tmp_path / "config.yaml").write_text("data:\n  path: /data/mri\n")
    assert run_locations(tmp_path) == ["/data/mri"]
    (tmp_path / "data.json").write_text(json.dumps({"locations": ["synthetic", "/x"]}))
    assert run_locations(tmp_path) == ["synthetic", "/x"]


def test_a_run_begun_on_a_relative_path_keeps_its_fingerprint(synth, tmp_path, monkeypatch):
    from advseg.data import cache_key, read_uwmgi
    from advseg.data.record import data_fingerprint, same_data

    copy_of(synth, tmp_path / "mri")
    monkeypatch.chdir(tmp_path)
    config = DataConfig(path="mri", cache_dir=tmp_path / "c", preprocess=PreprocessConfig(size=16))
    data = load_data(config)
    before, _ = read_uwmgi(Path("mri"))  # the index as it was built before paths were resolved
    spelt = cache_key(before, config.preprocess, content=False)  # what such a run saved
    assert spelt != data_fingerprint(data) and same_data(spelt, data)
    assert same_data(data_fingerprint(data), data) and not same_data("0" * 24, data)
