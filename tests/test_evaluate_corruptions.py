"""Corruption cells in the evaluation: records with corruption and severity, the clean columns
those of the attack cells, the images TorchIO's draws for each slice whatever the batching."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from advseg.cli import main
from advseg.config import to_dict
from advseg.corruptions import corrupt, corruption_seed
from advseg.data import UWMGI_CLASSES, PreprocessConfig, write_synthetic
from advseg.evaluate.corrupted import evaluate_corruptions
from advseg.models import create_model
from advseg.models.checkpoint import metadata_for, save_checkpoint
from advseg.runs.records import read_records


def cli(args: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_:
        main(args)
    return exit_.value.code


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("corrupt-eval")
    data = root / "data"
    write_synthetic(data, cases=3, scans=1, slices=4)
    torch.manual_seed(0)
    model = create_model("unet-tiny")
    preprocessing = to_dict(PreprocessConfig(size=32))
    data_config = {"path": str(data), "cache_dir": str(root / "cache")}
    source = {"config": data_config, "test_fraction": 0.34, "split_seed": 0}
    meta = metadata_for(model, list(UWMGI_CLASSES), preprocessing=preprocessing, data=source)
    save_checkpoint(root / "tiny", model, meta)
    return root


def test_evaluate_corruption_writes_records_beside_an_attack(setup, capsys):
    out = setup / "run"
    args = ["evaluate", str(setup / "tiny"), "--out", str(out), "--attack", "fgsm"]
    args += ["--corruption", "motion:3", "--corruption", "noise:1", "--corruption", "noise:5"]
    assert cli([*args, "--loss", "bce", "--batch-size", "3", "--device", "cpu"]) == 0
    assert "corruption:motion:3" in capsys.readouterr().out  # Table II has the cells
    files = sorted(p.name for p in (out / "records").iterdir())
    assert files == [
        "tiny__corruption-motion-3__eps0.parquet",
        "tiny__corruption-noise-1__eps0.parquet",
        "tiny__corruption-noise-5__eps0.parquet",
        "tiny__fgsm__eps0.009.parquet",
    ]
    records = read_records(out)
    corrupted = records[records["corruption"] != ""]
    assert set(zip(corrupted["corruption"], corrupted["severity"], strict=True)) == {
        ("motion", 3), ("noise", 1), ("noise", 5),
    }  # fmt: skip
    assert (corrupted["loss"] == "none").all() and (corrupted["eps"] == 0).all()
    attacked = records[records["corruption"] == ""]
    assert (attacked["severity"] == 0).all()
    # one clean reference: every cell's clean columns are the attack cell's, slice by slice
    key = ["slice_id", "class"]
    clean = ["tp_clean", "fp_clean", "fn_clean", "dice_clean"]
    reference = attacked.set_index(key)[clean].sort_index()
    for _, cell in corrupted.groupby("attack"):
        pd.testing.assert_frame_equal(cell.set_index(key)[clean].sort_index(), reference)
    noisy = corrupted.groupby("severity")["l2"].mean()
    assert noisy[5] > noisy[1] > 0  # severity 5 moves the images further


def test_a_mistyped_corruption_is_one_line(setup, capsys):
    out = setup / "typo"
    code = cli(["evaluate", str(setup / "tiny"), "--out", str(out), "--corruption", "motoin:3"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--corruption: unknown corruption 'motoin'" in err and "Traceback" not in err
    assert not out.exists()


class _Data:
    """A SliceSource over given tensors."""

    classes = ("a",)

    def __init__(self, images: torch.Tensor, masks: torch.Tensor) -> None:
        n = len(images)
        self.images, self.masks = images, masks
        self.index = pd.DataFrame(
            {
                "id": [f"s{i}" for i in range(n)],
                "case": [i % 2 for i in range(n)],
                "scan": ["x"] * n,
                "slice": list(range(n)),
            }
        )

    def dataset(self, rows):
        return [{"image": self.images[r], "mask": self.masks[r], "row": r} for r in rows]


def test_each_slice_s_corruption_is_its_own_draw_whatever_the_batch_size():
    torch.manual_seed(0)
    images, masks = torch.rand(5, 3, 24, 24), (torch.rand(5, 1, 24, 24) > 0.5).float()
    data = _Data(images, masks)
    model = torch.nn.Conv2d(3, 1, 3, padding=1)
    cells = [("ghosting", 4), ("biasfield", 2)]
    runs = [
        evaluate_corruptions(
            model, data, range(5), cells, model_name="m", arch="conv", batch_size=size, examples=5
        )
        for size in (1, 2, 5)
    ]
    for one, other in zip(runs[0], runs[2], strict=True):
        pd.testing.assert_frame_equal(one.records, other.records)
        np.testing.assert_array_equal(one.examples["x_adv"], other.examples["x_adv"])
    # the example images are corrupt() with the slice's seed
    ghosts = runs[1][0].examples
    for j, slice_id in enumerate(ghosts["slice_ids"]):
        i = int(slice_id[1:])
        expected = corrupt(images[i : i + 1], "ghosting", 4,
                           seed=corruption_seed(0, "ghosting", 4, slice_id))  # fmt: skip
        np.testing.assert_array_equal(ghosts["x_adv"][0, j], expected[0].numpy())
