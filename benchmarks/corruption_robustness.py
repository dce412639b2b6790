"""Corruption robustness of a plain, an adversarially trained and a corruption-trained model, on
the phantom (Kaggle-layout MRI) and the synthetic abdominal CT (NIfTI), through the CLI.

For each data set: ``advseg data synth``, three ``advseg train`` runs (the same settings but
the defence: none, ``--adv-train fgsm-rs --adv-eps 0.03``, ``--augment corruptions``), then
``advseg evaluate`` of the three checkpoints with every corruption at every severity
(``--corruption all``, 40 cells) and the optimised ``biasfield`` attack against random bias
fields of the same bound (``--steps 0``: one random field at the bound per slice).

Prints, from the records (per-class DSC): DSC per corruption at each severity, mCE / mrCE
against the plain model (Hendrycks & Dietterich 2019, error 1 - DSC), the optimised and random
``biasfield`` DSC, and the Dice drop by structure size (when ``advseg.report.sizes`` exists).
All CLI calls run with ``--threads 1``. The models are small and briefly trained (CPU minutes):
the numbers show what the pipeline measures, not a finding about robustness.

    python benchmarks/corruption_robustness.py [--out /tmp/corrupt-measure] [--kind phantom]
        [--epochs 4] [--size 64] [--analyse-only]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

MODELS = {  # run name -> the train options that make it
    "plain": [],
    "adv": ["--adv-train", "fgsm-rs", "--adv-eps", "0.03"],
    "corr": ["--augment", "corruptions"],
}
BIAS = [(0.3, 10), (0.6, 20)]  # (eps, steps) of the optimised biasfield


def advseg(*args: str) -> float:
    """Run ``advseg ARGS`` (this interpreter); its wall time in seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "advseg", *args], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def run(out: Path, kind: str, epochs: int, size: int) -> None:
    data = out / "data"
    if not data.exists():
        advseg("data", "synth", "--kind", kind, "--out", str(data), "--cases", "8",
               "--scans", "1", "--slices", "24")  # fmt: skip
    common = ["--data", str(data), "--cache-dir", str(out / "cache"), "--threads", "1"]
    for name, options in MODELS.items():
        if (out / name / "checkpoints" / "best.json").exists():
            continue
        seconds = advseg("train", "--out", str(out / name), *common, "--model", "unet",
                         "--size", str(size), "--epochs", str(epochs), "--lr", "2e-3",
                         "--batch-size", "8", "--test-fraction", "0.25", "--val-fraction",
                         "0.2", "--patience", "0", *options)  # fmt: skip
        print(f"{kind}: trained {name} in {seconds:.0f} s", flush=True)
    checkpoints = [str(out / name / "checkpoints" / "best") for name in MODELS]
    if not (out / "corrupted").exists():
        seconds = advseg("evaluate", *checkpoints, "--out", str(out / "corrupted"), *common,
                         "--corruption", "all", "--protocol", "per-class")  # fmt: skip
        print(f"{kind}: 40 corruption cells x 3 models in {seconds:.0f} s", flush=True)
    for eps, steps in BIAS:
        for label, n in (("optimised", steps), ("random", 0)):
            folder = out / f"biasfield-{label}-{eps:g}"
            if folder.exists():
                continue
            seconds = advseg("evaluate", *checkpoints, "--out", str(folder), *common,
                             "--attack", "biasfield", "--eps", f"{eps:g}", "--steps", str(n),
                             "--loss", "dicefocal", "--protocol", "per-class")  # fmt: skip
            print(f"{kind}: biasfield {label} eps {eps:g} in {seconds:.0f} s", flush=True)


def analyse(out: Path, kind: str) -> None:
    from advseg.report.corruptions import corruption_table
    from advseg.runs.records import read_records
    from advseg.stats.summary import summarize_cells

    records = read_records(out / "corrupted")
    table, summary = corruption_table(records, "per-class", baseline="plain")
    print(f"\n## {kind}: DSC (per-class) per corruption and severity\n")
    columns = ["model", "corruption", *[f"dsc_s{s}" for s in range(1, 6)], "dsc_mean", "ce", "rce"]
    print(table[columns].round(3).to_string(index=False))
    print(f"\n## {kind}: per model (mCE against plain)\n")
    print(summary.round(3).to_string(index=False))
    rows = []
    for eps, _ in BIAS:
        for label in ("optimised", "random"):
            cells = summarize_cells(read_records(out / f"biasfield-{label}-{eps:g}"), "per-class")
            for _, cell in cells.iterrows():
                rows.append({"model": cell["model"], "eps": eps, "kind": label,
                             "dsc_clean": cell["dsc_clean"], "dsc": cell["dsc_adv"]})  # fmt: skip
    frame = pd.DataFrame(rows).pivot_table(
        index=["model", "eps", "dsc_clean"], columns="kind", values="dsc"
    )
    frame["optimised - random"] = frame["optimised"] - frame["random"]
    print(f"\n## {kind}: biasfield optimised vs random at the same bound (per-class DSC)\n")
    print(frame.round(3).reset_index().to_string(index=False))
    try:
        from advseg.report.sizes import size_table
    except ImportError:
        return
    corrupted = records[records["severity"] >= 3]
    print(f"\n## {kind}: Dice drop by structure size (corruptions, severities 3-5)\n")
    print(size_table(corrupted).round(3).to_string(index=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/corrupt-measure"))
    parser.add_argument("--kind", choices=["phantom", "nifti"], default="phantom")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--analyse-only", action="store_true")
    args = parser.parse_args()
    out = args.out / args.kind
    out.mkdir(parents=True, exist_ok=True)
    if not args.analyse_only:
        run(out, args.kind, args.epochs, args.size)
    analyse(out, args.kind)


if __name__ == "__main__":
    main()
