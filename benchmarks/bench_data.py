"""Data pipeline throughput: write, index, decode (cold cache), cached reads, RLE decoding.

Every figure is measured in this run on a synthetic set of at least 5,000 slices (written first,
in the Kaggle layout, so the real reader path is timed), and the RLE decoder is compared with a
plain per-run Python loop over the same strings.

    python benchmarks/bench_data.py                  # 20 cases x 2 scans x 128 slices = 5,120
    python benchmarks/bench_data.py --cases 40 --size 128
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from advseg.data import DataConfig, PreprocessConfig, build_index, load_data, write_synthetic
from advseg.data.rle import rle_decode, rle_decode_loop, rle_encode


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--scans", type=int, default=2)
    parser.add_argument("--slices", type=int, default=128)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default: temp)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(1)

    work = Path(tempfile.mkdtemp(prefix="bench-data-", dir=args.dir))
    root = work / "synth"
    figures: dict[str, float] = {}
    try:
        summary, t = _timed(
            lambda: write_synthetic(root, cases=args.cases, scans=args.scans, slices=args.slices)
        )
        n = summary.slices
        figures["slices"] = n
        figures["write_slices_per_s"] = n / t

        config = DataConfig(
            path=root,
            cache_dir=work / "cache",
            preprocess=PreprocessConfig(size=args.size),
            workers=args.workers,
        )
        (index, _), t = _timed(lambda: build_index(config))
        figures["index_slices_per_s"] = len(index) / t

        data, t = _timed(lambda: load_data(config))
        assert data.decoded == n
        figures["cold_load_slices_per_s"] = n / t  # index + decode + preprocess + write cache

        data, t_open = _timed(lambda: load_data(config))
        assert data.decoded == 0
        figures["warm_open_s"] = t_open  # index + hash + memory-map, nothing decoded
        loader = torch.utils.data.DataLoader(data.dataset(), batch_size=32, num_workers=0)
        _, t = _timed(lambda: sum(int(b["row"].numel()) for b in loader))
        figures["cached_dataset_slices_per_s"] = n / t

        # RLE: every non-empty mask string of the set, vectorised vs a per-run Python loop.
        rles = [
            (r, h, w)
            for cls in data.classes
            for r, h, w in zip(index[cls], index["height"], index["width"], strict=True)
            if r
        ]
        runs = sum(len(r.split()) // 2 for r, _, _ in rles)
        _, t_vec = _timed(lambda: [rle_decode(r, h, w) for r, h, w in rles])
        _, t_loop = _timed(lambda: [rle_decode_loop(r, h, w) for r, h, w in rles])
        for r, h, w in rles[:50]:
            assert np.array_equal(rle_decode(r, h, w), rle_decode_loop(r, h, w))
        figures["rle_masks"] = len(rles)
        figures["rle_mean_runs"] = runs / max(len(rles), 1)
        figures["rle_vectorised_masks_per_s"] = len(rles) / t_vec
        figures["rle_loop_masks_per_s"] = len(rles) / t_loop
        figures["rle_speedup"] = t_loop / t_vec
        # The same on fragmented masks (many runs each): where a per-run loop hurts most.
        rng = np.random.default_rng(0)
        noisy = [rle_encode(rng.random((266, 266)) < 0.05) for _ in range(200)]
        _, t_vec = _timed(lambda: [rle_decode(r, 266, 266) for r in noisy])
        _, t_loop = _timed(lambda: [rle_decode_loop(r, 266, 266) for r in noisy])
        figures["rle_fragmented_runs"] = float(np.mean([len(r.split()) // 2 for r in noisy]))
        figures["rle_fragmented_speedup"] = t_loop / t_vec
    finally:
        shutil.rmtree(work)

    print(
        f"data benchmark: {n} slices ({args.cases} cases x {args.scans} scans x "
        f"{args.slices}), preprocessed to {args.size}x{args.size}, {args.workers} workers"
    )
    print(f"  write synthetic set      {figures['write_slices_per_s']:10.0f} slices/s")
    print(f"  build index              {figures['index_slices_per_s']:10.0f} slices/s")
    print(f"  cold load (decode+cache) {figures['cold_load_slices_per_s']:10.0f} slices/s")
    print(f"  warm open (no decode)    {figures['warm_open_s']:10.2f} s")
    print(
        f"  cached Dataset reads     {figures['cached_dataset_slices_per_s']:10.0f} slices/s "
        f"({figures['cached_dataset_slices_per_s'] / figures['cold_load_slices_per_s']:.0f}x "
        "cold load)"
    )
    print(f"  RLE decode, vectorised   {figures['rle_vectorised_masks_per_s']:10.0f} masks/s")
    print(
        f"  RLE decode, Python loop  {figures['rle_loop_masks_per_s']:10.0f} masks/s  "
        f"({figures['rle_masks']} masks, {figures['rle_mean_runs']:.0f} runs each on average)"
    )
    print(f"  RLE speed-up             {figures['rle_speedup']:10.2f}x")
    print(
        f"  RLE speed-up, fragmented {figures['rle_fragmented_speedup']:10.2f}x  "
        f"(200 noise masks, {figures['rle_fragmented_runs']:.0f} runs each)"
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
