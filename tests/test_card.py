"""Robustness cards and the leaderboard: three tiny models whose metadata says plain, Gaussian
noise and PGD adversarial training, each carded on 2 held-out slices with a reduced protocol."""

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
SMALL = ["--max-slices", "2", "--sea-steps", "4", "--certify-n", "8", "--batch-size", "2"]


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
    assert len(corruptions["cells"]) == 5 * len(corruptions["per_corruption"]) >= 5 * 8
    assert corruptions["dice"] == pytest.approx(np.mean([c["dice"] for c in corruptions["cells"]]))
    deviations = card["protocol"]["deviations"]
    assert len(deviations) == 3 and "at most 2 held-out slices (max_slices)" in deviations
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
        clean = [float(v) for v in page.locator("tbody tr td:nth-child(5)").all_inner_texts()]
        assert clean == sorted(clean)
        page.locator("th", has_text="clean Dice").click()  # and descending
        clean = [float(v) for v in page.locator("tbody tr td:nth-child(5)").all_inner_texts()]
        assert clean == sorted(clean, reverse=True)
        assert seen.errors == [] and seen.external == []
