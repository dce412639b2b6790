"""The benchmark scripts run end to end at toy sizes and print their ratio lines (no timing is
asserted: these machines are noisy; the figures are read from full runs)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(BENCHMARKS.parent / "src")}
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_bench_attack_prints_each_way_its_ratios_and_the_targets():
    toy = ["--size", "32", "--batch", "2", "--batches", "1", "--repeats", "1"]
    out = _run("bench_attack.py", *toy)
    assert "malloc: " in out
    assert all(f" {way} " in out for way in ("a", "b", "c", "vmapped", "d"))
    assert "a/c" in out and "b/c" in out and "c/d" in out
    assert "targets: b/c >= 1.4" in out and "c/d <= 1.15" in out


def test_bench_sweep_prints_its_ratios_and_the_target():
    toy = [
        "--size",
        "32",
        "--batch",
        "1",
        "--batches",
        "1",
        "--repeats",
        "1",
        "--eps",
        "0.009,0.03",
    ]
    out = _run("bench_sweep.py", *toy)
    assert "images: sweep/one" in out and "scored: sweep/one" in out and "cells/one" in out
    assert "target: images sweep/one <= 1.3" in out


def test_bench_train_prints_images_per_second():
    out = _run("bench_train.py", "--size", "32", "--batch", "2", "--steps", "1", "--demo-sizes", "")
    assert "img/s" in out and "1.00x" in out


def test_bench_data_prints_its_throughputs(tmp_path):
    args = ["--cases", "2", "--scans", "1", "--slices", "4", "--size", "32", "--workers", "0"]
    out = _run("bench_data.py", *args, "--dir", str(tmp_path))
    assert "slices/s" in out


def test_bench_fingerprint_prints_its_ratios(tmp_path):
    args = ["--cases", "2", "--scans", "1", "--slices", "4", "--size", "32", "--repeats", "1"]
    out = _run("bench_fingerprint.py", *args, "--dir", str(tmp_path))
    assert "ratios: warm / stat" in out and "cold / decode" in out


@pytest.mark.slow  # minutes on a shared 2-core machine: four methods, three of them attacking
def test_bench_adversarial_training_prints_its_ratios():
    args = ["--model", "unet-tiny", "--size", "32", "--batch", "2", "--steps", "1"]
    args += ["--threads", "1", "--rounds", "1", "--pgd-steps", "2"]
    out = _run("bench_adversarial_training.py", *args)
    assert "1.00x plain" in out and "fgsm-rs" in out and "pgd-2" in out and "trades-4" in out


@pytest.mark.slow
def test_bench_transfer_prints_attack_runs_and_the_ratio():
    toy = ["--size", "32", "--slices", "2", "--steps", "1", "--repeats", "1"]
    out = _run("bench_transfer.py", *toy, "--models", "unet-tiny,unet")
    assert "naive: 4 attack runs" in out and "(crafted once): 2 attack runs" in out
    assert "a/b = " in out


@pytest.mark.slow  # minutes on a shared 2-core machine: two attacks and two SEA runs
def test_bench_apgd_prints_its_ratio_and_what_sea_skipping_saves():
    args = ["--model", "unet-tiny", "--size", "32", "--batch", "2", "--steps", "4"]
    out = _run("bench_apgd.py", *args, "--repeats", "1", "--train-steps", "1")
    assert "apgd/pgd step" in out and "target <= 1.1x" in out
    assert "skipping saves" in out


@pytest.mark.slow  # five fresh processes importing torch and MONAI, a minute or more when shared
def test_bench_volume_attack_prints_time_and_memory_ratios():
    out = _run("bench_volume_attack.py", "--roi", "16", "--repeats", "1")
    assert "time / floor: step k=0" in out and "(target <= 1.25)" in out
    assert "memory k=4: 8/1" in out and "(target 8/1 <= 1.5)" in out
    assert "memory monai: 8/1" in out


@pytest.mark.slow  # 40 cells of records, even at toy sizes (about 100 s on a shared CPU)
def test_bench_corruptions_prints_the_grid_against_one_attack_cell():
    toy = ["--size", "32", "--slices", "2", "--batch", "2", "--steps", "1", "--repeats", "1"]
    out = _run("bench_corruptions.py", *toy, "--model", "unet-tiny")
    assert "grid/attack" in out and "TorchIO share" in out and "motion:" in out


@pytest.mark.slow
def test_minnorm_curve_prints_both_curves_their_agreement_and_the_time_ratio(tmp_path):
    toy = ["--out", str(tmp_path), "--kinds", "phantom", "--size", "32", "--slices", "2",
           "--train-steps", "5", "--runs", "alma-prox:5,pdpgd:5", "--apgd-steps", "2",
           "--refine", "2x2"]  # fmt: skip
    out = _run("minnorm_curve.py", *toy)
    assert "  curve " in out and "  sweep " in out
    assert "slices, alma-prox:5 " in out and "slices, pdpgd:5 " in out  # both against one sweep
    assert "refine=2x2 vs" in out and "refine=off vs" in out  # refined and not, from one run
    assert "max |diff|" in out and "median min_eps" in out and "sweep's minimal eps" in out
    assert (tmp_path / "minnorm-curve-phantom-sigmoid.json").exists()
