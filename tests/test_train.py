import csv
import json

import pytest
import torch
from torch.utils.data import Dataset

from advseg.augment import AugmentConfig
from advseg.errors import UserError
from advseg.models import create_model, load_checkpoint
from advseg.models.checkpoint import read_checkpoint
from advseg.train import TrainConfig, global_dice, train

CLASSES = ["square", "disc"]


class Blobs(Dataset):
    """Tiny two-class segmentation set: a bright square and a dimmer disc on noise."""

    def __init__(self, n: int, size: int = 32, seed: int = 0, transform=None):
        self.n, self.size, self.seed, self.transform = n, size, seed, transform

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + i)
        s = self.size
        yy, xx = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
        mask = torch.zeros(2, s, s)
        x0, y0 = torch.randint(0, s - 10, (2,), generator=gen).tolist()
        mask[0, y0 : y0 + 8, x0 : x0 + 8] = 1
        cx, cy = torch.randint(6, s - 6, (2,), generator=gen).tolist()
        mask[1] = (((yy - cy) ** 2 + (xx - cx) ** 2) <= 25).float()
        grey = 0.1 * torch.rand(s, s, generator=gen) + 0.8 * mask[0] + 0.4 * mask[1]
        item = {"image": grey.clamp(0, 1).expand(3, s, s).clone(), "mask": mask, "row": i}
        return self.transform(item) if self.transform else item


class FailsAt(Dataset):
    """Wraps a dataset and raises after ``limit`` reads: a run killed in the middle of an epoch."""

    def __init__(self, inner: Dataset, limit: int):
        self.inner, self.limit, self.reads = inner, limit, 0

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int) -> dict:
        self.reads += 1
        if self.reads > self.limit:
            raise KeyboardInterrupt("killed")
        return self.inner[i]


def tiny_config(**overrides) -> TrainConfig:
    values = dict(
        model="unet-tiny",
        epochs=3,
        batch_size=4,
        lr=3e-3,
        patience=0,
        augment=AugmentConfig(enabled=False),
    )
    values.update(overrides)
    return TrainConfig(**values)


def run(out_dir, config=None, train_set=None, resume=False, seed=0):
    torch.manual_seed(seed)
    model = create_model("unet-tiny", in_channels=3, classes=2)
    return train(
        model,
        train_set if train_set is not None else Blobs(12),
        Blobs(6, seed=1),
        config or tiny_config(),
        out_dir,
        classes=CLASSES,
        preprocessing={"size": 32},
        data={"source": "blobs", "split_seed": 0},
        resume=resume,
    )


def test_training_learns_and_writes_checkpoints_and_log(tmp_path):
    result = run(tmp_path, tiny_config(epochs=4))
    assert result.epochs_run == 4 and len(result.history) == 4
    assert result.history[-1].train_loss < result.history[0].train_loss
    assert result.best_dice == max(s.val_dice for s in result.history)
    _, meta = load_checkpoint(result.best_path)
    assert meta.epoch == result.best_epoch
    assert meta.classes == CLASSES and meta.preprocessing == {"size": 32}
    assert meta.data["source"] == "blobs" and meta.train["loss"] == "dicefocal"
    assert meta.metrics["best"]["val_dice"] == pytest.approx(result.best_dice)
    with open(tmp_path / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    lrs = [float(r["lr"]) for r in rows]
    assert lrs[0] == pytest.approx(3e-3) and lrs == sorted(lrs, reverse=True)  # cosine decay


def test_cosine_schedule_ends_at_eta_min(tmp_path):
    result = run(tmp_path, tiny_config(epochs=2, eta_min=1e-4))
    _, _, state = read_checkpoint(result.last_path)
    assert state["scheduler"]["_last_lr"][0] == pytest.approx(1e-4)


def test_killed_mid_epoch_and_resumed_equals_an_uninterrupted_run(tmp_path):
    full = run(tmp_path / "full")
    # 12 training items per epoch + 6 validation reads are not counted (separate dataset):
    # the run dies in the middle of epoch 2.
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", train_set=FailsAt(Blobs(12), limit=12 + 6))
    _, meta, _ = read_checkpoint(tmp_path / "cut" / "checkpoints" / "last")
    assert meta.epoch == 1
    resumed = run(tmp_path / "cut", resume=True, seed=123)  # the fresh init is overwritten
    assert resumed.epochs_run == 3 and [s.epoch for s in resumed.history] == [1, 2, 3]
    assert [s.val_dice for s in resumed.history] == pytest.approx(
        [s.val_dice for s in full.history]
    )
    w_full, _, _ = read_checkpoint(full.last_path)
    w_cut, _, _ = read_checkpoint(resumed.last_path)
    for key, value in w_full.items():
        torch.testing.assert_close(w_cut[key], value)
    load_checkpoint(resumed.best_path)  # a valid best checkpoint


def test_early_stopping(tmp_path):
    config = tiny_config(epochs=6, patience=1, lr=1e-9, eta_min=1e-9)  # nothing improves
    result = run(tmp_path, config)
    assert result.stopped_early
    assert result.epochs_run == result.best_epoch + 1 < 6


def test_resume_checks(tmp_path):
    with pytest.raises(UserError, match="nothing to resume"):
        run(tmp_path, resume=True)
    run(tmp_path, tiny_config(epochs=1))
    with pytest.raises(UserError, match="already holds a run"):
        run(tmp_path, tiny_config(epochs=1))
    with pytest.raises(UserError, match=r"lr: 0.003 -> 0.1"):
        run(tmp_path, tiny_config(epochs=1, lr=0.1), resume=True)


def test_bad_input(tmp_path):
    with pytest.raises(UserError, match="training split is empty"):
        run(tmp_path, train_set=Blobs(0))
    with pytest.raises(UserError, match=r"train\.batch_size"):
        tiny_config(batch_size=0)
    with pytest.raises(UserError, match=r"train\.model is 'unet'"):
        run(tmp_path, tiny_config(model="unet"))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_and_channels_last_run_on_cpu(tmp_path, precision):
    config = tiny_config(epochs=1, precision=precision, channels_last=True, grad_accum=2)
    result = run(tmp_path, config)
    assert result.epochs_run == 1
    weights, meta, state = read_checkpoint(result.last_path)
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    assert meta.train["precision"] == precision
    assert state["scaler"] == {} if precision == "bf16" else state["scaler"]["scale"] > 0


def test_global_dice():
    counts = torch.tensor([[8.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # TP, FP, FN rows
    assert global_dice(counts) == pytest.approx(16 / 18)  # classes 2 and 3 never present
    assert global_dice(torch.zeros(3, 2)) == 1.0


def test_train_config_round_trips_through_yaml_dicts():
    from advseg.config import from_dict, to_dict

    config = tiny_config(precision="bf16")
    assert from_dict(TrainConfig, json.loads(json.dumps(to_dict(config)))) == config


def test_unknown_loss_and_model_names_list_the_valid_ones():
    with pytest.raises(
        UserError,
        match=r"train\.loss: unknown loss 'dicefocl'.*valid: balanced-bce, balanced-ce, bce",
    ):
        tiny_config(loss="dicefocl")
    with pytest.raises(UserError, match=r"unknown model 'unet-tiney'.*valid:"):
        tiny_config(model="unet-tiney")


def test_augmented_training_with_workers_is_reproducible(tmp_path):
    from advseg.augment import Augment

    config = tiny_config(epochs=1, num_workers=2, augment=AugmentConfig())
    runs = []
    for name in ("a", "b"):
        train_set = Blobs(8, transform=Augment(config.augment, 32))
        result = run(tmp_path / name, config, train_set=train_set)
        runs.append(read_checkpoint(result.last_path)[0])
    plain = run(tmp_path / "plain", tiny_config(epochs=1))
    for key, value in runs[0].items():
        torch.testing.assert_close(runs[1][key], value, rtol=0, atol=0)
    differs = any(
        not torch.equal(value, read_checkpoint(plain.last_path)[0][key])
        for key, value in runs[0].items()
    )
    assert differs  # the augmentation did change what was trained on


def test_auto_device_and_precision_on_this_machine():
    from advseg.train import resolve_device, resolve_precision

    device = resolve_device("auto")
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        assert resolve_precision("auto", device) == torch.float32
    assert resolve_precision("fp16", device) == torch.float16
    with pytest.raises(UserError, match=r"train\.device"):
        resolve_device("tpu:0")


def test_tensorboard_without_the_package_is_a_user_error(tmp_path):
    try:
        import tensorboard  # noqa: F401

        pytest.skip("tensorboard is installed here")
    except ImportError:
        pass
    with pytest.raises(UserError, match="tensorboard"):
        run(tmp_path, tiny_config(epochs=1, tensorboard=True))
