"""load_data end to end on the phantom: cache hits, memory maps, skipping, the Dataset."""

import numpy as np
import pytest
import torch

from advseg.config import from_dict, to_dict
from advseg.data import DataConfig, PreprocessConfig, cache_key, load_data, read_uwmgi
from advseg.data.rle import rle_decode
from advseg.errors import UserError
from data_corpus import copy_of, first_png, tiny_synthetic


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return tiny_synthetic(tmp_path_factory.mktemp("cache"))


def _config(root, **kw):
    return DataConfig(
        path=root, cache_dir=root / "cache", preprocess=PreprocessConfig(size=32), **kw
    )


def test_second_load_decodes_nothing_and_is_memory_mapped(synth, tmp_path):
    root = copy_of(synth, tmp_path / "d")
    first = load_data(_config(root))
    assert first.decoded == 24
    second = load_data(_config(root))
    assert second.decoded == 0 and second.cache_path == first.cache_path
    assert isinstance(second.images, np.memmap) and isinstance(second.masks, np.memmap)
    np.testing.assert_array_equal(first.images, second.images)
    assert second.images.shape == (24, 32, 32) and second.images.dtype == np.float32
    assert second.masks.shape == (24, 3, 32, 32) and second.masks.dtype == np.uint8
    assert second.images.min() >= 0 and second.images.max() <= 1
    assert [p.name for p in (root / "cache").iterdir()] == [first.cache_path.name]


def test_arrays_match_the_index_rows(synth, tmp_path):
    data = load_data(_config(copy_of(synth, tmp_path / "d"), exclude="none"))
    row = int(np.flatnonzero(data.index["small_bowel"].ne(""))[0])
    r = data.index.iloc[row]
    full = rle_decode(r["small_bowel"], r["height"], r["width"])
    k = data.classes.index("small_bowel")
    assert data.masks[row, k].sum() > 0
    assert abs(data.masks[row, k].mean() - full.mean()) < 0.05


def test_key_changes_with_preprocessing_and_data_but_not_channels(synth, tmp_path):
    root = copy_of(synth, tmp_path / "d")
    index, _ = read_uwmgi(root)
    base = cache_key(index, PreprocessConfig(size=32))
    assert cache_key(index, PreprocessConfig(size=32, channels=5, stack="neighbours")) == base
    assert cache_key(index, PreprocessConfig(size=48)) != base
    assert cache_key(index, PreprocessConfig(size=32, mask_resize="area")) != base
    assert cache_key(index, PreprocessConfig(size=32, resize="stretch")) != base
    edited = index.copy()
    edited.loc[0, "stomach"] = "1 5"
    assert cache_key(edited, PreprocessConfig(size=32)) != base
    first_png(root).write_bytes(first_png(root).read_bytes() + b"\0")  # file size changes
    assert cache_key(index, PreprocessConfig(size=32)) != base


def test_unreadable_slice_stops_or_is_skipped_and_counted(synth, tmp_path):
    root = copy_of(synth, tmp_path / "d")
    png = first_png(root)
    png.write_bytes(png.read_bytes()[:500])  # truncated
    with pytest.raises(UserError, match=f"{png}: cannot decode image"):
        load_data(_config(root))
    assert not any((root / "cache").iterdir())  # nothing cached, nothing half-written
    data = load_data(_config(root, skip_unreadable=True))
    assert len(data) == 23 and data.images.shape[0] == 23
    assert len(data.exclusions.skipped) == 1
    ((sid, reason),) = data.exclusions.skipped.items()
    assert sid not in set(data.index["id"]) and "cannot decode" in reason
    again = load_data(_config(root, skip_unreadable=True))  # a cache hit keeps the count
    assert again.decoded == 0 and again.exclusions.skipped == data.exclusions.skipped
    with pytest.raises(UserError, match="cannot decode"):  # without the option: still an error
        load_data(_config(root))


def test_dataset_items_and_transform_hook(synth, tmp_path):
    data = load_data(_config(copy_of(synth, tmp_path / "d")))
    seen = []

    def flip(item):
        seen.append(item["row"])
        return {**item, "image": item["image"].flip(-1), "mask": item["mask"].flip(-1)}

    ds = data.dataset([3, 7], transform=flip)
    item = ds[1]
    assert len(ds) == 2 and item["row"] == 7 and seen == [7]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["mask"].shape == (3, 32, 32) and item["mask"].dtype == torch.float32
    np.testing.assert_array_equal(item["image"][0].numpy(), data.images[7][:, ::-1])
    batch = next(iter(torch.utils.data.DataLoader(data.dataset(), batch_size=4)))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["row"].tolist() == [0, 1, 2, 3]


def test_two_and_a_half_d_channels_are_neighbouring_slices(synth, tmp_path):
    root = copy_of(synth, tmp_path / "d")
    pre = PreprocessConfig(size=32, channels=3, stack="neighbours")
    data = load_data(DataConfig(path=root, cache_dir=root / "cache", preprocess=pre))
    item = data.dataset()[1]  # slice 2 of the first scan: slices 1, 2, 3
    for c, row in enumerate([0, 1, 2]):
        np.testing.assert_array_equal(item["image"][c].numpy(), data.images[row])


def test_data_config_reads_from_yaml_dict(synth):
    cfg = from_dict(
        DataConfig,
        {
            "path": str(synth),
            "exclude": ["case1_day3"],
            "preprocess": {"size": 64},
            "nifti_labels": {1: "liver", "2": "tumour"},
        },
    )
    assert cfg.exclude == ["case1_day3"] and cfg.preprocess.size == 64
    assert from_dict(DataConfig, to_dict(cfg)) == cfg
    with pytest.raises(UserError, match=r"data\.preprocess\.size"):
        from_dict(DataConfig, {"preprocess": {"size": "big"}}, where="data")


def test_synthetic_means_the_phantom_written_once(tmp_path, monkeypatch):
    import advseg.data.synth as synth_module

    calls = []
    real = synth_module.write_synthetic

    def small(out, overwrite=False):
        calls.append(out)
        return real(out, cases=1, scans=1, slices=3, overwrite=overwrite)

    monkeypatch.setattr(synth_module, "write_synthetic", small)
    config = DataConfig(path="synthetic", cache_dir=tmp_path, preprocess=PreprocessConfig(size=16))
    data = load_data(config)
    assert len(data) == 3 and calls == [tmp_path / "synthetic"]
    assert data.location == "synthetic" and data.synthetic
    assert load_data(config).decoded == 0 and len(calls) == 1
