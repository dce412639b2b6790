"""docs/api.md: every python block runs, in order, on a tiny checkpoint trained on the phantom."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def python_blocks(text: str) -> list[str]:
    """The ```python fenced blocks of a Markdown page, in order."""
    return re.findall(r"^```python\n(.*?)^```$", text, flags=re.MULTILINE | re.DOTALL)


@pytest.fixture()
def tiny_checkpoint(tmp_path, monkeypatch):
    """runs/tiny/checkpoints/best in a fresh working directory, as `advseg train --data
    synthetic --model unet-tiny --out runs/tiny` makes it (smaller: a 32 px phantom)."""
    from advseg.augment import AugmentConfig
    from advseg.data import DataConfig, PreprocessConfig, write_synthetic
    from advseg.train import TrainConfig, train_on_data

    monkeypatch.setenv("ADVSEG_CACHE", str(tmp_path / "cache"))
    write_synthetic(tmp_path / "cache" / "synthetic", cases=4, scans=1, slices=6, seed=0)
    monkeypatch.chdir(tmp_path)
    data = DataConfig(path=Path("synthetic"), preprocess=PreprocessConfig(size=32))
    train = TrainConfig(
        model="unet-tiny",
        epochs=1,
        batch_size=4,
        device="cpu",
        augment=AugmentConfig(enabled=False),
    )
    train_on_data(data, train, "runs/tiny", test_fraction=0.25, val_fraction=0.34)
    return tmp_path / "runs" / "tiny" / "checkpoints" / "best"


def test_every_example_of_the_api_page_runs(tiny_checkpoint, capsys):
    blocks = python_blocks(DOC.read_text())
    assert len(blocks) >= 4  # load, attack, score, the engine
    namespace: dict = {"__name__": "api_docs"}
    for number, block in enumerate(blocks, 1):
        code = compile(block, f"{DOC.name} block {number}", "exec")
        exec(code, namespace)  # the page's own examples, run as a reader would
    out = capsys.readouterr().out
    assert "unet-tiny" in out and "Dice clean" in out and "DSC clean" in out
    trained = namespace["trained"]
    assert len(trained.test_rows) > 0 and namespace["x_adv"].shape == namespace["x"].shape
