"""Behaviour unchanged by a refactor: the same experiments on two commits, compared file by file.

Issue 24 (the house: rooms, layers, lazy imports, HD95 once per pair) must change no number. This
script extracts two commits of this repository into temporary trees (``git archive``), runs the
same experiments on each with the same seeds and one thread, and compares every file of the two
run directories byte for byte:

- ``demo``: the demo experiment (``configs/demo.yaml`` of the BEFORE commit, copied into both
  trees, so a later change of the shipped demo does not count as a difference) through
  ``advseg demo``;
- ``grid``: a small grid (:data:`GRID`): 2 models (``unet-tiny``, ``smp:Unet:resnet18`` from
  random init) x 2 attacks (FGSM under two losses at two eps, PGD-3 with transfer cells) at
  32x32 pixels, one epoch, 24 test slices, with its report, through ``advseg run``.

Both trees run in the same run directory (one after the other, the first moved aside), so that
paths written into files (the phantom lives inside the run directory) are the same. What may
differ, and only that, is listed in :data:`TEXT_RULES` and :data:`CSV_RULES`: dates, measured
seconds and images/s, a checkpoint's random save id, the cache's inode/mtime file keys, matplotlib's
random SVG ids. A file that differs in bytes is compared again with those parts set aside; the
script says, per file: identical bytes, the same but for the listed parts, or DIFFERENT (with the
first differing lines). Parquet records and safetensors checkpoints are also compared by content
(every column / every tensor exactly), so a difference in their bytes is explained.

Run: ``python benchmarks/refactor_identity.py [--before 8d3c139] [--after HEAD]``
(several minutes on 2 cores; ``--only demo`` or ``--only grid`` runs one). Exit status 1 when a
file differs beyond the listed fields.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

GRID = """\
name: identity-grid
seed: 0
data:
  path: synthetic
  preprocess:
    size: 32
split:
  test_fraction: 0.25
  val_fraction: 0.2
  seed: 0
train:
  epochs: 1
  batch_size: 8
  device: cpu
  augment:
    enabled: false
models:
  - arch: unet-tiny
  - arch: smp:Unet:resnet18
attacks:
  - name: fgsm
    losses: [bce, dicefocal]
    eps: [0.01, 0.03]
  - name: pgd
    losses: [bce]
    eps: [0.01]
    kwargs:
      steps: 3
    transfer: true
evaluation:
  slices: with_mask
  max_slices: 24
  batch_size: 8
  examples: 1
  protocol: per-class
report: true
"""

# What may differ between two runs of the same code, and why; nothing else is set aside.
_DATE = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?([+-]\d\d:\d\d|Z)?"
TEXT_RULES: list[tuple[str, str, str]] = [  # (file pattern, removed pattern, why)
    (r"^provenance\.json$", rf'"started": "{_DATE}"', "the session's start date"),
    (r"(^|/)checkpoints/[a-z]+\.json$",
     r'"save_id": "[0-9a-f]+"|"(images_per_s|seconds|train_seconds)": [0-9.e+-]+',
     "the checkpoint's random save id and the measured training seconds and images/s"),
    (r"^data/[0-9a-f]+/digests\.json$", r'"\d+:\d+:\d+:\d+"',
     "the cache's file keys (inode:size:mtime:ctime of the phantom's PNGs just written); "
     "the content digests stay"),
    (r"\.svg$", r"<dc:date>[^<]*</dc:date>|(id|xlink:href|clip-path)=\"[^\"]*\"",
     "matplotlib's SVG date and its random element ids"),
    (r"^report/(report\.md|report\.html|provenance\.csv)$", _DATE + r"|trained in \d+ s",
     "dates and training seconds in the report's provenance"),
]  # fmt: skip
CSV_RULES: list[tuple[str, list[str], str]] = [  # (file pattern, removed columns, why)
    (r"(^|/)log\.csv$", ["images_per_s", "seconds"], "measured training speed and seconds"),
    (r"^report/training\.csv$", ["train_seconds", "time_ratio"],
     "measured training seconds (and their ratio to the plain model's)"),
]  # fmt: skip
# The report's training table prints train_seconds and time_ratio (4 decimals): those values,
# read from each run's report/training.csv, are set aside in report.md/html too.
_TABLE_FILE, _TABLE_COLUMNS = "report/training.csv", ["train_seconds", "time_ratio"]
_STATE = {"lock", ".lock", "run.lock"}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def extract(commit: str, into: Path) -> str:
    """``git archive`` of ``commit`` unpacked in ``into``; the full commit id."""
    full = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", commit], check=True, capture_output=True, text=True
    ).stdout.strip()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", full], check=True, capture_output=True
    ).stdout
    into.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return full


def run(tree: Path, args: list[str], log: Path) -> dict[str, float]:
    """``advseg ARGS`` with ``tree``'s code, one thread; wall and CPU seconds (children's)."""
    env = dict(os.environ, PYTHONPATH=str(tree / "src"), ADVSEG_THREADS="1",
               PYTHONHASHSEED="0", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # fmt: skip
    before, start = os.times(), time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run([PYTHON, "-m", "advseg", *args, "--threads", "1"], cwd=tree,
                              env=env, stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    after = os.times()
    if done.returncode != 0:
        raise SystemExit(f"advseg {' '.join(args)} failed in {tree}: see {log}")
    cpu = (after.children_user - before.children_user) + (
        after.children_system - before.children_system
    )
    return {"wall": time.perf_counter() - start, "cpu": cpu}


def files(run_dir: Path) -> dict[str, Path]:
    return {
        str(p.relative_to(run_dir)): p
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.name not in _STATE
    }


def measured_numbers(run_dir: Path) -> list[str]:
    """The report's measured numbers (training seconds and their ratios) as it prints them."""
    import pandas as pd

    table = run_dir / _TABLE_FILE
    if not table.is_file():
        return []
    frame = pd.read_csv(table)
    values = [v for c in _TABLE_COLUMNS if c in frame for v in frame[c].dropna()]
    return sorted({f"{float(v):.4f}" for v in values}, key=len, reverse=True)


def set_aside(name: str, path: Path, run_dir: Path) -> tuple[str, str] | None:
    """The file's text with the volatile parts replaced, and why; None when no rule applies."""
    import pandas as pd

    for pattern, columns, why in CSV_RULES:
        if re.search(pattern, name):
            frame = pd.read_csv(path)
            return frame.drop(columns=[c for c in columns if c in frame]).to_csv(), why
    for pattern, remove, why in TEXT_RULES:
        if re.search(pattern, name):
            text = re.sub(remove, "<volatile>", path.read_text(errors="replace"))
            if name.startswith("report/report."):
                for number in measured_numbers(run_dir):
                    text = text.replace(number, "<volatile>")
                why += " and its training table (train_seconds, time_ratio)"
            return text, why
    return None


def same_content(name: str, a: Path, b: Path, dirs: tuple[Path, Path]) -> tuple[bool, str]:
    """Whether two files with different bytes hold the same results, and what differs."""
    if name.endswith(".parquet"):
        import pandas as pd
        import pyarrow.parquet as pq

        left, right = pd.read_parquet(a), pd.read_parquet(b)
        added = [c for c in right.columns if c not in left.columns]
        gone = [c for c in left.columns if c not in right.columns]
        common = [c for c in left.columns if c in right.columns]
        try:
            pd.testing.assert_frame_equal(left[common], right[common], check_exact=True)
        except AssertionError as err:
            return False, f"records differ: {str(err).splitlines()[0:3]}"
        meta = [pq.read_schema(p).metadata or {} for p in (a, b)]
        keys = sorted(k.decode() for k in set(meta[0]) | set(meta[1])
                      if meta[0].get(k) != meta[1].get(k))  # fmt: skip
        if added or gone:
            return False, (f"the {len(common)} common columns equal exactly ({len(left)} rows); "
                           f"columns only after: {added}, only before: {gone}")  # fmt: skip
        return True, f"records equal exactly ({len(left)} rows); Parquet metadata differs: {keys}"
    if name.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(a, "pt") as fa, safe_open(b, "pt") as fb:
            names = fa.keys()
            if sorted(names) != sorted(fb.keys()):
                return False, "other tensors"
            for key in names:
                if not fa.get_tensor(key).equal(fb.get_tensor(key)):
                    return False, f"tensor {key} differs"
            ma, mb = fa.metadata() or {}, fb.metadata() or {}
        keys = sorted(k for k in set(ma) | set(mb) if ma.get(k) != mb.get(k))
        return True, f"every tensor bit-equal; header metadata differs: {keys}"
    left, right = set_aside(name, a, dirs[0]), set_aside(name, b, dirs[1])
    if left is None or right is None:
        return False, first_difference(a, b)
    if left[0] == right[0]:
        return True, f"equal but for {left[1]}"
    diff = difflib.unified_diff(left[0].splitlines(), right[0].splitlines(), lineterm="", n=0)
    return False, " | ".join(line[:160] for line in list(diff)[2:6])


def first_difference(a: Path, b: Path) -> str:
    try:
        left, right = a.read_text().splitlines(), b.read_text().splitlines()
    except UnicodeDecodeError:
        return "binary"
    diff = [line for line in difflib.unified_diff(left, right, lineterm="", n=0)][2:6]
    return " | ".join(line[:160] for line in diff)


def compare(before: Path, after: Path) -> tuple[list[str], bool]:
    """Lines of the comparison of two run directories; whether they hold the same behaviour."""
    fa, fb = files(before), files(after)
    lines, ok, identical = [], True, 0
    for name in sorted(set(fa) - set(fb)):
        lines.append(f"  ONLY BEFORE {name}")
        ok = False
    for name in sorted(set(fb) - set(fa)):
        lines.append(f"  ONLY AFTER  {name}")
        ok = False
    for name in sorted(set(fa) & set(fb)):
        if sha256(fa[name]) == sha256(fb[name]):
            identical += 1
            continue
        same, why = same_content(name, fa[name], fb[name], (before, after))
        lines.append(f"  {'same      ' if same else 'DIFFERENT '}  {name}: {why}")
        ok &= same
    common = len(set(fa) & set(fb))
    lines.insert(0, f"  {identical} of {common} common files byte-identical "
                    f"({len(fa)} before, {len(fb)} after)")  # fmt: skip
    return lines, ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", default="8d3c139", help="commit before (default 8d3c139)")
    parser.add_argument("--after", default="HEAD", help="commit after (default HEAD)")
    parser.add_argument("--only", choices=["demo", "grid"], help="one experiment (default both)")
    parser.add_argument("--work", type=Path, help="work directory (default: a new temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"),
                        help="only compare two run directories already written")  # fmt: skip
    args = parser.parse_args(argv)
    if args.compare:
        lines, ok = compare(*args.compare)
        print(f"{'SAME BEHAVIOUR' if ok else 'DIFFERENT'}\n" + "\n".join(lines))
        return 0 if ok else 1
    work = args.work or Path(tempfile.mkdtemp(prefix="advseg-identity-"))
    work.mkdir(parents=True, exist_ok=True)
    trees = {side: work / "trees" / side for side in ("before", "after")}
    commits = {side: extract(getattr(args, side), tree) for side, tree in trees.items()}
    demo_yaml = trees["before"] / "src" / "advseg" / "configs" / "demo.yaml"
    shutil.copyfile(demo_yaml, trees["after"] / "src" / "advseg" / "configs" / "demo.yaml")
    (work / "grid.yaml").write_text(GRID)
    print(f"before {commits['before'][:12]}, after {commits['after'][:12]}; work {work}")
    print(f"load average at start: {os.getloadavg()}")
    experiments = {
        "demo": lambda run_dir: ["demo", "--out", str(run_dir)],
        "grid": lambda run_dir: ["run", str(work / "grid.yaml"), "--out", str(run_dir),
                                 "--data", "synthetic", "--cache-dir", str(run_dir / "data")],
    }  # fmt: skip
    all_ok = True
    for name, command in experiments.items():
        if args.only and name != args.only:
            continue
        run_dir = work / name / "run"  # the same path for both trees
        for side in ("before", "after"):
            shutil.rmtree(run_dir, ignore_errors=True)
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            times = run(trees[side], command(run_dir), work / f"{name}-{side}.log")
            run_dir.rename(work / name / side)
            print(f"{name} {side}: {times['wall']:.1f} s wall, {times['cpu']:.1f} s CPU")
        lines, ok = compare(work / name / "before", work / name / "after")
        all_ok &= ok
        print(f"{name}: {'SAME BEHAVIOUR' if ok else 'DIFFERENT'}")
        print("\n".join(lines))
    print(f"load average at end: {os.getloadavg()}")
    if not args.keep and args.work is None:
        shutil.rmtree(work)
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
