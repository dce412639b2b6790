"""A transfer matrix crafted once per source against crafting again for every target.

Every model of the set is a source and a target (the full matrix, diagonal = white-box):

(a) naive: for each (source, target) pair, attack the source on the test slices, then score the
    images on the target (one attack run per pair: sources x targets);
(b) advseg: each source's white-box cell keeps its images (``keep_adversarial``) and every other
    target scores them (``evaluate_cell(..., crafted=...)``): one attack run per source.

Both give the same records (checked). Prints the attack runs and the time of each way (best of
the repeats) and their ratio a/b.

    python benchmarks/bench_transfer.py [--size 64] [--slices 32] [--steps 5] [--repeats 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from advseg.allocator import keep_freed_memory
from advseg.crossmodel.transfer import reader
from advseg.data import DataConfig, PreprocessConfig, load_data, write_synthetic
from advseg.evaluate import evaluate_cell
from advseg.models.zoo import create_model

MODELS = ["unet-tiny", "unet", "smp:FPN:mobilenet_v2"]


def naive(models, data, rows, args):
    frames, runs = [], 0
    for source, source_net in models.items():
        for target, target_net in models.items():
            crafted = evaluate_cell(
                source_net, data, rows, "pgd", ["bce"], args.eps, model_name=source, arch=source,
                attack_kwargs={"steps": args.steps}, keep_adversarial=True,
            )  # fmt: skip
            runs += 1
            if target == source:
                frames.append(crafted.records)
                continue
            scored = evaluate_cell(
                target_net, data, rows, "pgd", ["bce"], args.eps, model_name=target, arch=target,
                attack_kwargs={"steps": args.steps},
                crafted=reader(crafted.adversarial, ["bce"]), source=source,
            )  # fmt: skip
            frames.append(scored.records)
    return pd.concat(frames, ignore_index=True), runs


def once(models, data, rows, args):
    frames, runs = [], 0
    for source, source_net in models.items():
        crafted = evaluate_cell(
            source_net, data, rows, "pgd", ["bce"], args.eps, model_name=source, arch=source,
            attack_kwargs={"steps": args.steps}, keep_adversarial=True,
        )  # fmt: skip
        runs += 1
        for target, target_net in models.items():
            if target == source:
                frames.append(crafted.records)
                continue
            scored = evaluate_cell(
                target_net, data, rows, "pgd", ["bce"], args.eps, model_name=target, arch=target,
                attack_kwargs={"steps": args.steps},
                crafted=reader(crafted.adversarial, ["bce"]), source=source,
            )  # fmt: skip
            frames.append(scored.records)
    return pd.concat(frames, ignore_index=True), runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--slices", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--eps", type=float, default=0.03)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()
    keep_freed_memory()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic(Path(tmp) / "data", cases=2, scans=1, slices=max(args.slices, 4))
        data = load_data(
            DataConfig(
                path=Path(tmp) / "data",
                cache_dir=Path(tmp) / "cache",
                preprocess=PreprocessConfig(size=args.size),
            )
        )
        rows = np.arange(min(args.slices, len(data.index)))
        models = {name: create_model(name).eval() for name in args.models.split(",")}
        times = {"naive": [], "once": []}
        results = {}
        for _ in range(args.repeats):
            for name, way in (("naive", naive), ("once", once)):
                start = time.perf_counter()
                results[name] = way(models, data, rows, args)
                times[name].append(time.perf_counter() - start)
    keys = ["source", "model", "slice_id", "class"]
    a = results["naive"][0].sort_values(keys).reset_index(drop=True)
    b = results["once"][0].sort_values(keys).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)
    n = len(models)
    print(f"{n} models, {len(rows)} slices at {args.size} px, PGD {args.steps} steps, matrix "
          f"{n}x{n}; the same records both ways")  # fmt: skip
    print(f"(a) naive: {results['naive'][1]} attack runs, {min(times['naive']):.2f} s")
    print(
        f"(b) advseg (crafted once): {results['once'][1]} attack runs, {min(times['once']):.2f} s"
    )
    print(f"a/b = {min(times['naive']) / min(times['once']):.2f}")


if __name__ == "__main__":
    main()
