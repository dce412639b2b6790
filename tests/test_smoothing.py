"""Randomized-smoothing certification (SegCertify) against scipy and its defining properties."""

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from advseg.defences.smoothing import (
    SmoothingConfig,
    binomial_pvalue,
    certified_radius,
    certify_batch,
    clopper_pearson_lower,
    holm_bonferroni,
)
from advseg.errors import UserError
from advseg.evaluate.certify import certify_cell
from advseg.metrics import hard_prediction
from advseg.runs.records import RECORD_COLUMNS


class Confident(nn.Module):
    """Logits ``scale * (x - 0.5)`` on each channel: a sure model where x is far from 0.5."""

    def __init__(self, scale: float = 50.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale))

    def forward(self, x):
        return self.scale * (x - 0.5)


def _image(size: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(2, 3, size, size, generator=g) > 0.5).float() * 0.8 + 0.1  # 0.1 or 0.9


@pytest.mark.parametrize("k, n, alpha", [(90, 100, 0.001), (60, 100, 0.05), (999, 1000, 0.01)])
def test_radius_is_sigma_times_probit_of_the_clopper_pearson_bound(k, n, alpha):
    ours = certified_radius(clopper_pearson_lower(k, n, alpha), 0.25)
    p_lower = stats.binomtest(k, n).proportion_ci(confidence_level=1 - 2 * alpha, method="exact")
    assert ours == pytest.approx(0.25 * stats.norm.ppf(p_lower.low), rel=1e-9)
    assert certified_radius(np.array([0.4, 0.5]), 1.0).tolist() == [0.0, 0.0]  # no certificate


def test_binomial_pvalue_is_the_upper_tail():
    assert binomial_pvalue(7, 10, 0.5) == pytest.approx(
        stats.binomtest(7, 10, 0.5, "greater").pvalue
    )


def test_holm_bonferroni_against_the_textbook_loop():
    rng = np.random.default_rng(0)
    for _ in range(20):
        p = rng.uniform(0, 0.02, size=rng.integers(1, 30)) ** rng.uniform(1, 3)
        alpha = 0.05
        expected = np.zeros(p.size, dtype=bool)
        for i, j in enumerate(np.argsort(p, kind="stable")):
            if p[j] > alpha / (p.size - i):
                break
            expected[j] = True
        assert np.array_equal(holm_bonferroni(p, alpha), expected)
    assert holm_bonferroni(np.array([0.01, 0.04, 0.03]), 0.05).tolist() == [True, False, False]


def test_tiny_sigma_and_a_confident_model_certify_the_plain_prediction():
    model, x = Confident(), _image()
    config = SmoothingConfig(sigma=1e-4, n0=8, n=32, alpha=0.001, radii=[0.0])
    certificate = certify_batch(model, x, config, torch.Generator().manual_seed(0))
    assert torch.equal(certificate.decision, hard_prediction(model(x)))
    assert certificate.certified(0.0).all()  # nothing abstains
    assert (certificate.radius > 0).all()


def test_abstention_rises_as_n_falls():
    model = Confident(scale=8.0)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))  # some near 0.5
    rates = []
    for n in (512, 64, 8):
        config = SmoothingConfig(sigma=0.25, n0=8, n=n, alpha=0.001)
        certificate = certify_batch(model, x, config, torch.Generator().manual_seed(1))
        rates.append(1 - certificate.certified(0.0).mean())
    assert rates[0] < rates[1] < rates[2]
    assert rates[2] == 1.0  # 8 agreeing draws cannot beat alpha / (pixels)


def test_larger_radius_certifies_fewer_decisions():
    model = Confident(scale=8.0)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    config = SmoothingConfig(sigma=0.25, n0=8, n=256)
    certificate = certify_batch(model, x, config, torch.Generator().manual_seed(2))
    shares = [certificate.certified(r).mean() for r in (0.0, 0.1, 0.2, 0.4)]
    assert shares == sorted(shares, reverse=True) and shares[0] > shares[-1]


def test_certify_cell_records_count_abstentions_as_wrong():
    from test_evaluate import MemoryData

    data = MemoryData(4, size=16, seed=3)
    model = Confident(scale=6.0)
    config = SmoothingConfig(sigma=0.2, n0=8, n=64, radii=[0.0, 0.3])
    records = certify_cell(model, data, range(4), config, model_name="m", arch="toy")
    assert list(records.columns) == list(RECORD_COLUMNS)
    assert len(records) == 2 * 4 * 3
    assert set(records["attack"]) == {"certify"} and set(records["loss"]) == {"sigma=0.2"}
    assert set(records["eps"]) == {0.0, 0.3} and not records["dice_adv"].isna().any()
    pixels = 16 * 16
    for row in records.itertuples():
        assert row.tp_adv + row.fn_adv == row.gt_pixels  # every organ pixel is right or wrong
        assert row.tp_adv + row.fn_adv + row.fp_adv <= pixels
        assert row.fp_adv + row.tp_adv + row.fn_adv >= row.abstained * pixels - 1e-9
    at = records.groupby("eps")["abstained"].mean()
    assert at[0.3] > at[0.0]
    assert (
        records.groupby("eps")["dice_adv"].mean()[0.3]
        <= records.groupby("eps")["dice_adv"].mean()[0.0]
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [({"sigma": 0}, "sigma"), ({"n": 0}, "n: 0 must lie in"), ({"alpha": 1.5}, "alpha"),
     ({"radii": [-1.0]}, "radii"), ({"radii": []}, "radii")],
)  # fmt: skip
def test_bad_settings_are_user_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        SmoothingConfig(**kwargs)


def test_certify_cli_writes_certified_records_and_a_table(tmp_path, capsys):
    from advseg.config import to_dict
    from advseg.data import UWMGI_CLASSES, PreprocessConfig, write_synthetic
    from advseg.evaluate.certify import read_certified
    from advseg.models import create_model
    from advseg.models.checkpoint import metadata_for, save_checkpoint
    from test_evaluate_cli import cli

    write_synthetic(tmp_path / "data", cases=3, scans=1, slices=4)
    torch.manual_seed(0)
    net = create_model("unet-tiny")
    source = {"config": {"path": str(tmp_path / "data"), "cache_dir": str(tmp_path / "cache")},
              "test_fraction": 0.34, "split_seed": 0}  # fmt: skip
    meta = metadata_for(net, list(UWMGI_CLASSES), preprocessing=to_dict(PreprocessConfig(size=32)),
                        data=source)  # fmt: skip
    save_checkpoint(tmp_path / "tiny", net, meta)
    out = tmp_path / "run"
    args = ["certify", str(tmp_path / "tiny"), "--out", str(out), "--sigma", "0.1", "--n0", "4"]
    args += ["--cache-dir", str(tmp_path / "c2")]
    assert cli([*args, "--n", "16", "--radius", "0", "--radius", "0.05", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0] == f"data: {tmp_path / 'data'}"
    assert "certified Dice" in printed and "abstained" in printed
    assert len(list((tmp_path / "c2").iterdir())) == 1  # --cache-dir took the arrays
    records = read_certified(out)
    assert (out / "certified" / "tiny__sigma0.1.parquet").exists()
    assert set(records["eps"]) == {0.0, 0.05} and set(records["model"]) == {"tiny"}
    assert records["gt_pixels"].gt(0).groupby(records["slice_id"]).any().all()  # masked slices
    assert cli([*args, "--n", "0"]) == 2
    assert "--n: 0 must lie in [1, 1,000,000]" in capsys.readouterr().err
    (tmp_path / "data").rename(tmp_path / "elsewhere")  # moved: one line, no phantom instead
    assert cli([*args, "--n", "16"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'data'}, is not there" in err and "pass --data PATH" in err
    assert cli([*args, "--n", "16", "--data", str(tmp_path / "elsewhere")]) == 0
