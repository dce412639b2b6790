"""Transfer attacks, ensembles and universal perturbations, in the library and in a grid."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from advseg.attacks import create_attack
from advseg.augment import AugmentConfig
from advseg.crossmodel.transfer import (
    LossEnsemble,
    ModelIO,
    check_same_io,
    craft,
    crafted_dir,
    load_crafted,
    transfer_matrix,
    transfer_pairs,
)
from advseg.data import DataConfig, PreprocessConfig, load_data, write_synthetic
from advseg.errors import UserError
from advseg.experiment import (
    AttackSpec,
    EvaluationSpec,
    ExperimentConfig,
    ModelSpec,
    SplitSpec,
    check_config,
    plan_cells,
    run_experiment,
)
from advseg.losses import create_loss
from advseg.models import load_checkpoint
from advseg.models.ensemble import EnsembleModel, build_ensemble
from advseg.report import write_report
from advseg.runs.records import RECORD_COLUMNS, check_records, read_records, white_box
from advseg.stats.summary import summarize_cells
from advseg.train import TrainConfig

EPS = 0.03


def _net(seed: int, classes: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, classes, 3, padding=1)
    ).eval()


# ------------------------------------------------------------------------------ the library


def test_transfer_pairs_leave_out_white_box_and_keep_ensembles():
    assert transfer_pairs(["a", "b"], [], True) == [("a", "b"), ("b", "a")]
    assert transfer_pairs(["a", "b", "c"], ["a+b"], False) == [
        ("a+b", "a"),
        ("a+b", "b"),
        ("a+b", "c"),
    ]
    assert transfer_pairs(["a", "b"], ["a"], True) == [("a", "b"), ("b", "a")]


def test_ensemble_model_averages_probabilities_and_one_member_is_the_member():
    a, b = _net(0), _net(1)
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        mean = (a(x).sigmoid() + b(x).sigmoid()) / 2
        assert torch.allclose(EnsembleModel([a, b])(x).sigmoid(), mean, atol=1e-6)
        soft = (a(x).softmax(1) + b(x).softmax(1)) / 2
        assert torch.allclose(EnsembleModel([a, b], "softmax")(x).softmax(1), soft, atol=1e-6)
        assert build_ensemble([a]) is a  # an ensemble of one is that model
        assert torch.allclose(EnsembleModel([a])(x), a(x), atol=1e-4)
    # white-box through every member: the input gradient depends on both
    x.requires_grad_(True)
    EnsembleModel([a, b])(x).sum().backward()
    grad_ab = x.grad.clone()
    x.grad = None
    EnsembleModel([a, a])(x).sum().backward()
    assert not torch.allclose(grad_ab, x.grad)


def test_ensemble_members_with_other_outputs_are_refused_by_name():
    model = EnsembleModel([_net(0), _net(1, classes=2)], names=["left", "right"])
    with pytest.raises(UserError, match="'left' and 'right' predict different shapes"):
        model(torch.rand(1, 3, 8, 8))


@pytest.mark.parametrize("loss", ["bce", "focal", "dice", "dicefocal"])
def test_loss_ensemble_is_the_mean_of_the_members_losses(loss):
    a, b = _net(0), _net(1)
    x = torch.rand(2, 3, 8, 8)
    y = (torch.rand(2, 3, 8, 8) > 0.5).float()
    per_sample = create_loss(loss, reduction="none")
    stack = LossEnsemble([a, b])
    with torch.no_grad():
        expected = (per_sample(a(x), y) + per_sample(b(x), y)) / 2
        assert torch.allclose(per_sample(stack(x), stack.tile(y)), expected, atol=1e-6)


def test_check_same_io_names_both_models():
    a = ModelIO("unet-a", 3, ("large_bowel", "small_bowel", "stomach"), 64)
    with pytest.raises(UserError, match=r"'unet-a' and 'unet-b' .*input size 64 vs 32"):
        check_same_io(a, ModelIO("unet-b", 3, a.classes, 32))
    with pytest.raises(UserError, match=r"'unet-a' and 'c1' .*input channels 3 vs 1"):
        check_same_io(a, ModelIO("c1", 1, a.classes, 64))
    with pytest.raises(UserError, match=r"classes"):
        check_same_io(a, ModelIO("k2", 3, ("stomach", "liver"), 64))
    check_same_io(a, ModelIO("same", 3, a.classes, 64))


def test_universal_perturbation_keeps_its_budget_is_shared_and_seeded():
    model = _net(0)
    g = torch.Generator().manual_seed(0)
    x = 0.2 + 0.6 * torch.rand(6, 3, 8, 8, generator=g)  # no clipping at eps 0.03
    y = (torch.rand(6, 3, 8, 8, generator=g) > 0.5).float()
    dataset = [{"image": x[i], "mask": y[i]} for i in range(6)]
    attack = create_attack("universal", model, "bce", EPS, steps=8, fit_batch_size=4)
    delta = attack.fit(dataset)
    assert delta.shape == (3, 8, 8) and delta.abs().max() <= EPS + 1e-7
    x_adv = attack(x, y)
    assert torch.allclose(x_adv - x, delta.expand_as(x), atol=1e-6)  # one delta for all
    again = create_attack("universal", model, "bce", EPS, steps=8, fit_batch_size=4)
    assert torch.equal(again.fit(dataset), delta)  # seeded
    loss = create_loss("bce", reduction="none")
    with torch.no_grad():
        assert loss(model(x_adv), y).mean() > loss(model(x), y).mean()
    noise = attack.random_sign(0)
    assert noise.abs().unique().tolist() == pytest.approx([float(delta.abs().max())])
    l2 = create_attack("universal", model, "bce", 0.5, norm="l2", steps=4).fit(dataset)
    assert float(l2.norm()) <= 0.5 + 1e-5


def test_old_records_without_source_are_white_box():
    row = {c: 0 for c in RECORD_COLUMNS if c != "source"} | {"model": "m", "slice_id": "s"}
    frame = check_records(pd.DataFrame([row]))
    assert frame["source"].tolist() == ["m"] and len(white_box(frame)) == 1


# ---------------------------------------------------------------------------------- a grid


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    root = tmp_path_factory.mktemp("transfer")
    write_synthetic(root / "data", cases=3, scans=1, slices=10, seed=0)
    config = ExperimentConfig(
        name="transfer",
        data=DataConfig(
            path=root / "data", cache_dir=root / "cache", preprocess=PreprocessConfig(size=32)
        ),
        split=SplitSpec(test_fraction=0.34, val_fraction=0.5),
        train=TrainConfig(
            epochs=1, batch_size=4, device="cpu", augment=AugmentConfig(enabled=False)
        ),
        models=[
            ModelSpec(arch="unet-tiny", name="a"),
            ModelSpec(arch="unet-tiny", name="b"),
            ModelSpec(arch="ensemble:a+b"),
            ModelSpec(arch="ensemble:a", name="just-a"),
        ],
        attacks=[
            AttackSpec(name="fgsm", losses=["bce", "focal"], eps=[EPS], sources=["a", "b"]),
            AttackSpec(name="pgd", losses=["bce"], eps=[EPS], kwargs={"steps": 2}, sources=["a+b"]),
            AttackSpec(name="universal", losses=["bce"], eps=[EPS], kwargs={"steps": 4}),
        ],
        evaluation=EvaluationSpec(batch_size=4, examples=0, max_slices=6),
        report=False,
    )
    run_dir = root / "run"
    result = run_experiment(config, run_dir)
    return config, run_dir, result, read_records(run_dir)


def test_grid_plans_transfer_cells_once_per_pair(grid):
    config, _, result, records = grid
    slugs = [c.slug for c in plan_cells(config)]
    assert "b__fgsm__eps0.03__from-a" in slugs and "a__pgd__eps0.03__from-a+b" in slugs
    assert len(slugs) == len(set(slugs)) and result.grid.computed == slugs
    fgsm = records[records["attack"] == "fgsm"]
    pairs = set(zip(fgsm["source"], fgsm["model"], strict=True))
    models = ["a", "b", "ensemble-a-b", "just-a"]
    assert pairs == {(s, t) for s in ["a", "b"] for t in models} | {(m, m) for m in models}
    every = replace(config, attacks=[replace(config.attacks[0], sources=[], transfer=True)])
    transfer = [c for c in plan_cells(every) if c.source]
    assert len(transfer) == 4 * 3  # every ordered pair of distinct models
    pgd = records[records["attack"] == "pgd"]
    assert set(pgd["source"]) == {"a+b"} | set(pgd["model"])
    assert (records["linf"] <= EPS + 1e-6).all()


def test_transfer_diagonal_equals_white_box(grid):
    _, _, _, records = grid
    matrix = transfer_matrix(records, "per-class")
    diagonal = matrix[matrix["source"] == matrix["target"]].rename(columns={"target": "model"})
    cells = summarize_cells(white_box(records), "per-class")
    joined = diagonal.merge(cells, on=["model", "attack", "loss", "eps"], suffixes=("", "_wb"))
    assert len(joined) == len(cells) == len(diagonal)
    assert joined["attack_success"].tolist() == joined["as"].tolist()
    assert joined["dsc_adv"].tolist() == joined["dsc_adv_wb"].tolist()
    assert len(matrix) > len(diagonal)  # and there are off-diagonal cells


def test_transfer_scores_the_sources_own_images_crafted_once(grid):
    config, run_dir, _, records = grid
    data = load_data(config.data)
    slices = white_box(records[(records["model"] == "a") & (records["attack"] == "fgsm")])
    ids = list(dict.fromkeys(slices["slice_id"]))
    rows = [int(np.flatnonzero(data.index["id"].to_numpy() == i)[0]) for i in ids]
    saved = load_crafted(crafted_dir(run_dir, "a", "fgsm", EPS), ["bce", "focal"], ids)
    net, _ = load_checkpoint(run_dir / "models" / "a" / "checkpoints" / "best")
    again = craft(net, data, rows, "fgsm", ["bce", "focal"], EPS, attack_kwargs={"seed": 0},
                  batch_size=4)  # fmt: skip
    assert np.array_equal(saved["bce"], again["bce"])  # the white-box cell's own images
    # b scored on a's images: its adversarial DSC differs from b's white-box one, its clean
    # predictions are b's.
    on_b = records[(records["model"] == "b") & (records["attack"] == "fgsm")]
    from_a, own = on_b[on_b["source"] == "a"], on_b[on_b["source"] == "b"]
    assert from_a["tp_clean"].tolist() == own["tp_clean"].tolist()
    assert from_a["linf"].tolist() == pytest.approx(slices["linf"].tolist())


def test_ensemble_of_one_equals_its_member(grid):
    _, _, _, records = grid
    keys = ["source", "attack", "loss", "slice_id", "class"]
    member = white_box(records[records["model"] == "a"]).sort_values(keys[1:])
    alone = white_box(records[records["model"] == "just-a"]).sort_values(keys[1:])
    for column in ["tp_clean", "tp_adv", "fp_adv", "fn_adv", "linf"]:
        assert member[column].tolist() == pytest.approx(alone[column].tolist()), column


def test_universal_cells_save_the_perturbation_and_a_random_sign_baseline(grid):
    _, run_dir, _, records = grid
    universal = records[records["attack"].isin(["universal", "random-sign"])]
    assert set(universal["attack"]) == {"universal", "random-sign"}
    for model in ["a", "b", "ensemble-a-b", "just-a"]:
        delta = np.load(run_dir / "universal" / f"{model}__eps0.03__bce.npy")
        assert delta.ndim == 3 and np.abs(delta).max() <= EPS + 1e-7
        assert (run_dir / "universal" / f"{model}__eps0.03__bce.png").exists()
    norms = universal.groupby(["model", "attack"])["linf"].max().unstack()
    assert np.allclose(norms["universal"], norms["random-sign"], atol=1e-6)


def test_report_shows_matrix_ensembles_and_universal(grid):
    _, run_dir, _, _ = grid
    report = write_report(run_dir)
    html = report.html.read_text()
    for text in ["Transfer matrix", "did averaging help?", "Universal perturbations"]:
        assert text in html
    matrix = pd.read_csv(run_dir / "report" / "transfer_matrix.csv")
    assert {"source", "target", "attack_success", "dsc_adv"} <= set(matrix.columns)
    assert (run_dir / "report" / "transfer_fgsm_bce.png").exists()
    assert "white-box" not in set(report.table["model"])
    assert "verdict" in pd.read_csv(run_dir / "report" / "ensembles.csv").columns


def test_resumed_grid_gives_the_same_records(grid, tmp_path):
    config, run_dir, _, records = grid
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    (copy / "records" / "b__fgsm__eps0.03__from-a.parquet").unlink()
    (copy / "records" / "a__pgd__eps0.03__from-a+b.parquet").unlink()
    shutil.rmtree(copy / "adversarial" / "a+b__pgd__eps0.03")  # an ensemble source, re-crafted
    (copy / "records" / "b__universal__eps0.03.parquet").unlink()
    again = run_experiment(config, copy)
    assert sorted(again.grid.computed) == sorted(
        ["b__fgsm__eps0.03__from-a", "a__pgd__eps0.03__from-a+b", "b__universal__eps0.03"]
    )
    keys = ["model", "source", "attack", "loss", "slice_id", "class"]
    pd.testing.assert_frame_equal(
        read_records(copy).sort_values(keys).reset_index(drop=True),
        records.sort_values(keys).reset_index(drop=True),
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sources": ["a+zz"]}, r"attacks\[0\]\.sources\[0\]: 'a\+zz' is not a model"),
        ({"sources": ["a+a"]}, r"names a model twice"),
    ],
)
def test_bad_sources_are_refused(grid, change, message):
    config, _, _, _ = grid
    bad = replace(config, attacks=[replace(config.attacks[0], **change)])
    with pytest.raises(UserError, match=message):
        check_config(bad)


def test_bad_ensembles_are_refused(grid):
    config, _, _, _ = grid
    bad = replace(config, models=[*config.models[:2], ModelSpec(arch="ensemble:a+nope")])
    with pytest.raises(UserError, match=r"models\[2\]\.arch: ensemble member 'nope'"):
        check_config(bad)
    alone = replace(config, models=config.models[:1])
    with pytest.raises(UserError, match=r"transfer: needs at least two models"):
        check_config(
            replace(alone, attacks=[replace(config.attacks[0], sources=[], transfer=True)])
        )


def test_ensemble_verdict_is_undefined_when_attack_success_is():
    from advseg.report.cross_model import ensemble_verdicts

    def cell(model, arch, success):
        return {"model": model, "arch": arch, "attack": "fgsm", "loss": "bce", "eps": 0.03,
                "as": success, "dsc_adv": 0.0}  # fmt: skip

    cells = pd.DataFrame([
        cell("a", "unet", 0.2), cell("b", "fpn", float("nan")),
        cell("e", "ensemble:a+b", float("nan")),
    ])  # fmt: skip
    verdict = ensemble_verdicts(cells)["verdict"].tolist()
    assert len(verdict) == 1 and verdict[0].startswith("undefined")
    cells.loc[2, "as"] = 0.1
    verdict = ensemble_verdicts(cells)
    assert verdict["verdict"][0].startswith("helped") and verdict["best_member"][0] == "a"
