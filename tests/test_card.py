"""Robustness cards and the leaderboard: three tiny models whose metadata says plain, Gaussian
noise and PGD adversarial training, each carded on 2 held-out slices with a reduced protocol
(one corruption, 2 SEA steps, 8 noise samples: the default suite's cards take seconds); the
whole corruption grid of one card is checked by a slow test."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from advseg.card import SEA_EPS, CardConfig, make_card, read_card
from advseg.card.pages import leaderboard_rows
from advseg.cli import main
from advseg.config import to_dict
from advseg.data import UWMGI_CLASSES, PreprocessConfig, write_synthetic
from advseg.errors import UserError
from advseg.models import create_model
from advseg.models.checkpoint import metadata_for, save_checkpoint

MODELS = {
    "plain": {},
    "noise": {"noise_sigma": 0.25},
    "pgd": {"adversarial": {"method": "pgd", "eps": 0.03, "steps": 2}},
}
"""Three tiny models and how their metadata says they were trained (the card reads it)."""
SMALL = ["--max-slices", "2", "--sea-steps", "2", "--certify-n", "8", "--batch-size", "2"]
SMALL += ["--corruption", "noise"]


def cli(args: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_:
        main(args)
    return exit_.value.code


@pytest.fixture(scope="module")
def cards(tmp_path_factory):
    """Three seeded, untrained unet-tiny checkpoints on a small phantom (the card's plumbing is
    under test here, not training) and a reduced card of each, made by the CLI."""
    root = tmp_path_factory.mktemp("cards")
    write_synthetic(root / "data", cases=3, scans=1, slices=4)
    preprocessing = to_dict(PreprocessConfig(size=32))
    config = {"path": str(root / "data"), "cache_dir": str(root / "cache")}
    source = {"config": config, "test_fraction": 0.34, "split_seed": 0}
    for seed, (name, train) in enumerate(MODELS.items()):
        torch.manual_seed(seed)
        net = create_model("unet-tiny")
        meta = metadata_for(
            net, list(UWMGI_CLASSES), preprocessing=preprocessing, data=source,
            train={**train, "seed": seed}, metrics={"train_seconds": 10.0 * (seed + 1)},
        )  # fmt: skip
        checkpoint = root / "models" / name
        save_checkpoint(checkpoint, net, meta)
        args = ["card", str(checkpoint), "--out", str(root / "cards" / name), *SMALL]
        assert cli([*args, "--device", "cpu"]) == 0
    return root


def test_a_card_holds_the_protocols_numbers_with_their_slices(cards, capsys):
    from advseg.defences.smoothing import SmoothingConfig
    from advseg.evaluate.certify import certified_summary, certify_checkpoint

    card = read_card(cards / "cards" / "pgd")
    assert card["format"] == "advseg-card/1" and card["protocol"]["version"] == "advseg-card/1"
    model = card["model"]
    assert model["name"] == "pgd" and model["architecture"] == "unet-tiny" and model["params"] > 0
    assert model["training"]["method"] == "pgd" and model["training"]["eps"] == 0.03
    assert model["training"]["seconds"] == 30.0
    results = card["results"]
    assert [a["eps"] for a in results["sea"]["at"]] == list(SEA_EPS)
    assert [a["eps_255"] for a in results["sea"]["at"]] == [2, 4, 8]
    assert results["clean"]["slices"] == 2 and all(a["slices"] == 2 for a in results["sea"]["at"])
    assert results["robust"]["eps_255"] == 8
    for at in results["sea"]["at"]:  # SEA never leaves a slice better than clean
        assert at["dice"] <= results["clean"]["dice"] + 1e-9
    corruptions = results["corruptions"]
    assert corruptions["status"] == "measured" and corruptions["slices"] == 2
    assert len(corruptions["cells"]) == 5 and list(corruptions["per_corruption"]) == ["noise"]
    assert corruptions["dice"] == pytest.approx(np.mean([c["dice"] for c in corruptions["cells"]]))
    deviations = card["protocol"]["deviations"]
    assert len(deviations) == 4 and "at most 2 held-out slices (max_slices)" in deviations
    assert "corruptions noise only (protocol: all 8)" in deviations
    # 2 slices of 1 held-out case: every number says its interval is not meaningful
    for part in (results["clean"], *results["sea"]["at"], corruptions, results["certified"]):
        ci = part["interval"]
        assert ci["low"] is None and ci["high"] is None and not ci["meaningful"]
        assert ci["cases"] == part["cases"] == 1 and ci["slices"] == part["slices"]
        assert ci["text"] == "not meaningful: 1 case, 2 slices (< 5 cases); bounds left out"
    # the certified number is what `advseg certify` gives with the same settings
    smoothing = SmoothingConfig(sigma=0.25, n0=16, n=8, alpha=0.001, radii=[0.0, 0.1])
    checkpoint = cards / "models" / "pgd"
    with pytest.warns(UserWarning, match="not trained with Gaussian noise"):
        records = certify_checkpoint(checkpoint, smoothing, max_slices=2, device="cpu")
    expected = certified_summary(records).set_index("radius").loc[0.1]
    assert results["certified"]["dice"] == pytest.approx(expected["dsc_certified"])
    assert results["certified"]["slices"] == records["slice_id"].nunique()
    page = (cards / "cards" / "pgd" / "card.html").read_text()
    assert "Reduced card, not the full protocol" in page and "8/255" in page
    assert "not meaningful: 1 case, 2 slices (&lt; 5 cases)" in page
    assert "<script" not in page and "http" not in page.replace(
        model["checkpoint"], ""
    )  # nothing fetched


def test_the_noise_trained_card_says_its_training(cards):
    card = read_card(cards / "cards" / "noise")
    assert card["model"]["training"]["method"] == "noise"
    assert card["model"]["training"]["noise_sigma"] == 0.25
    assert not any("certified under" in line for line in card["warnings"])
    plain = read_card(cards / "cards" / "plain")
    assert plain["model"]["training"]["method"] == "none"
    assert any("trained with noise sigma 0, certified under 0.25" in w for w in plain["warnings"])


def test_a_broken_model_is_flagged_on_its_card_and_the_leaderboard(cards):
    from advseg.card import card_warnings
    from advseg.card.pages import card_page, leaderboard_rows

    model = {"name": "m", "training": {"noise_sigma": 0.25}}
    warnings = card_warnings({"clean": {"dice": 0.05}}, model)
    assert len(warnings) == 1 and warnings[0].startswith("clean Dice 0.050 is below 0.1")
    assert card_warnings({"clean": {"dice": 0.5}}, model) == []
    card = read_card(cards / "cards" / "noise")
    card["results"]["clean"]["dice"] = 0.05
    card["warnings"] = card_warnings(card["results"], card["model"])
    assert "Warning: clean Dice 0.050 is below 0.1" in card_page(card)
    assert leaderboard_rows([card])[0][0][0] == "noise (clean Dice < 0.1: broken)"
    card["results"]["clean"]["dice"] = 0.5
    card["warnings"] = card_warnings(card["results"], card["model"])
    assert card["warnings"] == [] and leaderboard_rows([card])[0][0][0] == "noise"


def test_leaderboard_sorts_by_robust_dice_and_marks_reduced_cards(cards, capsys):
    out = cards / "board.html"
    paths = [str(cards / "cards" / name) for name in MODELS]
    assert cli(["leaderboard", *paths, "--out", str(out)]) == 0
    page = out.read_text()
    assert page.count("<tr>") == 4  # header + three cards
    assert "Some cards are reduced" in page and "<script>" in page
    loaded = [read_card(p) for p in paths]
    rows = leaderboard_rows(loaded)
    robust = [row[7][1] for row in rows]
    assert robust == sorted(robust, reverse=True)
    assert {row[0][1] for row in rows} == set(MODELS)  # (shown, sort value): the names
    dice = {c["model"]["name"]: c["results"]["robust"]["dice"] for c in loaded}
    assert robust == sorted(dice.values(), reverse=True)


def test_bad_input_is_one_line(cards, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "other"}))
    assert cli(["leaderboard", str(bad), "--out", str(tmp_path / "b.html")]) == 2
    err = capsys.readouterr().err
    assert "not an advseg card" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b.html").exists()
    assert cli(["leaderboard", str(bad), "--out", str(tmp_path / "b.txt")]) == 2
    checkpoint = cards / "models" / "plain"
    with pytest.raises(UserError, match="--max-slices: 0 must be at least 1"):
        make_card(CardConfig(checkpoint, tmp_path / "c", max_slices=0))
    assert not (tmp_path / "c").exists()
    assert np.isfinite(read_card(cards / "cards" / "plain")["results"]["clean"]["dice"])


def test_card_and_leaderboard_open_cleanly_in_a_browser_and_sort(cards):
    from browser import browser, visit  # tests/ is on sys.path

    board = cards / "board-browser.html"
    paths = [str(cards / "cards" / name) for name in MODELS]
    assert cli(["leaderboard", *paths, "--out", str(board)]) == 0
    with browser() as launched:
        for name in MODELS:
            seen = visit(launched, cards / "cards" / name / "card.html")
            assert seen.errors == [] and seen.external == [], name
            assert "clean Dice" in seen.page.inner_text("body")
        seen = visit(launched, board)
        page = seen.page
        names = page.locator("tbody tr td:first-child").all_inner_texts()
        assert sorted(name.split(" (")[0] for name in names) == sorted(MODELS)
        page.locator("th", has_text="clean Dice").click()  # sort ascending by clean Dice
        texts = page.locator("tbody tr td:nth-child(5)").all_inner_texts()
        assert all("(no interval: not meaningful: 1 case, 2 slices" in t for t in texts)
        clean = [float(v.split()[0]) for v in texts]
        assert clean == sorted(clean)
        page.locator("th", has_text="clean Dice").click()  # and descending
        texts = page.locator("tbody tr td:nth-child(5)").all_inner_texts()
        clean = [float(v.split()[0]) for v in texts]
        assert clean == sorted(clean, reverse=True)
        assert seen.errors == [] and seen.external == []


def test_card_intervals_are_case_bootstraps_with_their_unit_counts():
    """Over 6 cases a card number has an interval: the case bootstrap of its records (the
    corruption mean's resamples the same cases in every cell), with its cases and slices."""
    import pandas as pd

    from advseg.card import card_interval
    from advseg.card.pages import interval_text
    from advseg.stats.bootstrap import case_bootstrap

    rng = np.random.default_rng(0)
    rows = []
    for cell in ("noise:1", "noise:2"):
        for case in range(6):
            for s in range(3):
                tp, fp, fn = rng.integers(1, 50, size=3)
                counts = {"tp_clean": tp, "fp_clean": fp, "fn_clean": fn, "tp_adv": tp // 2,
                          "fp_adv": fp, "fn_adv": fn + tp - tp // 2}  # fmt: skip
                rows.append({"cell": cell, "case": case, "slice_id": f"{case}_{s}", "class": "a",
                             "gt_pixels": tp + fn, **counts})  # fmt: skip
    records = pd.DataFrame(rows)
    one = records[records["cell"] == "noise:1"]
    ci = card_interval(one, "dsc_adv")
    reference = case_bootstrap(one, "per-class", draws=2000, seed=0)["dsc_adv"]
    assert (ci["low"], ci["high"]) == (reference.low, reference.high)
    assert ci["low"] < reference.estimate < ci["high"] and ci["meaningful"]
    assert (ci["cases"], ci["slices"]) == (6, 18)
    assert ci["text"] == "95% case bootstrap over 6 cases, 18 slices"
    assert interval_text({"interval": ci}) == f"[{ci['low']:.3f}, {ci['high']:.3f}]"
    pooled = card_interval(records, "dsc_adv", by="cell")
    per_cell = [card_interval(g, "dsc_adv") for _, g in records.groupby("cell")]
    assert min(c["low"] for c in per_cell) <= pooled["low"] <= max(c["high"] for c in per_cell)
    assert pooled["slices"] == 18  # the same slices in every cell, counted once
    few = card_interval(one[one["case"] < 4], "dsc_clean")
    assert few["low"] is None and not few["meaningful"] and few["cases"] == 4


@pytest.mark.slow
def test_a_full_corruption_grid_card(cards, tmp_path):
    """The protocol's corruption mean: every corruption at severities 1-5 (40 cells)."""
    args = ["card", str(cards / "models" / "plain"), "--out", str(tmp_path / "full")]
    args += ["--max-slices", "2", "--sea-steps", "1", "--certify-n", "4", "--device", "cpu"]
    assert cli(args) == 0
    corruptions = read_card(tmp_path / "full")["results"]["corruptions"]
    assert len(corruptions["cells"]) == 5 * len(corruptions["per_corruption"]) >= 5 * 8
    assert corruptions["dice"] == pytest.approx(np.mean([c["dice"] for c in corruptions["cells"]]))
    assert corruptions["interval"]["cases"] == 1 and corruptions["interval"]["low"] is None
