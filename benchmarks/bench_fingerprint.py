"""What the content-aware data fingerprint costs (issue 25), as ratios measured in one run.

The fingerprint (the cache key) hashes the image files' contents (:mod:`advseg.data.content`),
not only their sizes and mtimes, so a PNG rewritten with its size and mtime kept is noticed. On a
synthetic set in the Kaggle layout it times, each the median of ``--repeats``:

- ``stat``: the key as before (sizes and mtimes; ``content=False``);
- ``cold``: the content key with nothing known (every file read and hashed: a first load);
- ``warm``: the content key with the digests a cache entry keeps (stat keys only: every later
  load);
- ``decode``: a cold ``load_data`` (decode, preprocess, write the cache), what ``cold`` adds to.

and prints each as seconds and the ratios ``warm / stat``, ``cold / stat`` and
``cold / decode``.

    python benchmarks/bench_fingerprint.py                   # 20 cases x 2 scans x 64 slices
    python benchmarks/bench_fingerprint.py --cases 40 --slices 128
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from advseg.data import DataConfig, PreprocessConfig, build_index, load_data, write_synthetic
from advseg.data.cache import cache_key


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--scans", type=int, default=2)
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default: temp)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-fingerprint-", dir=args.dir))
    try:
        root = work / "synth"
        summary = write_synthetic(root, cases=args.cases, scans=args.scans, slices=args.slices)
        config = DataConfig(path=root, cache_dir=work / "cache",
                            preprocess=PreprocessConfig(size=args.size))  # fmt: skip
        index, _ = build_index(config)
        files = index["image_path"].unique()
        megabytes = sum(Path(p).stat().st_size for p in files) / 2**20
        pre = config.preprocess
        start = time.perf_counter()
        data = load_data(config)  # a cold load: decode, preprocess, cache (and the digests)
        decode = time.perf_counter() - start
        assert data.decoded == summary.slices
        figures = {
            "slices": summary.slices,
            "files": len(files),
            "megabytes": round(megabytes, 1),
            "stat_s": _median_time(lambda: cache_key(index, pre, content=False), args.repeats),
            "cold_s": _median_time(lambda: cache_key(index, pre), args.repeats),
            "warm_s": _median_time(lambda: cache_key(index, pre, work / "cache"), args.repeats),
            "decode_s": decode,
        }
        assert cache_key(index, pre, work / "cache") == data.cache_path.name
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"{figures['slices']} slices, {figures['files']} PNG files, {figures['megabytes']} MB: "
        f"stat key {figures['stat_s']:.4f} s, content key cold {figures['cold_s']:.4f} s, "
        f"warm {figures['warm_s']:.4f} s; cold load_data {figures['decode_s']:.2f} s"
    )
    figures["warm_over_stat"] = figures["warm_s"] / figures["stat_s"]
    figures["cold_over_stat"] = figures["cold_s"] / figures["stat_s"]
    figures["cold_over_decode"] = figures["cold_s"] / figures["decode_s"]
    print(
        f"ratios: warm / stat {figures['warm_over_stat']:.2f}, cold / stat "
        f"{figures['cold_over_stat']:.2f}, cold / decode {figures['cold_over_decode']:.3f}"
    )
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
