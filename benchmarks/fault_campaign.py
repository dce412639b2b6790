"""A fault campaign: a user's bad day, played against advseg; counts the cases handled well.

Each case is one bad input, option, damaged file, full disk or kill. A case is *handled well* when:

- a refusal: exit code 2, exactly one line on stderr that names what it must (the file, row, key
  or option), no traceback, and nothing written where it should not be (no run directory for a
  refused experiment, no partial file);
- a repair (a damaged cache entry): a warning line, then the work done right;
- a kill (``--kills``): the run resumes from its newest complete save to the same weights as a
  run never killed, and no temporary file is left.

    python benchmarks/fault_campaign.py            # refusals, repairs, full disks (a minute)
    python benchmarks/fault_campaign.py --kills    # + kill -9 at 7 instants of a save (slow)
    python benchmarks/fault_campaign.py -v         # print every case's outcome

It prints one line per failed case and a count per category, then ``tried N, handled well M``.
The corpus it draws on is the tests' (``tests/data_corpus.py``, ``tests/test_data_errors.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import os
import shutil
import sys
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

from advseg.cli import main as advseg_main  # noqa: E402
from advseg.data import DataConfig, PreprocessConfig, load_data  # noqa: E402

try:  # the campaign also runs against advseg versions from before this class existed
    from advseg.errors import AdvsegWarning
except ImportError:  # pragma: no cover
    AdvsegWarning = UserWarning  # type: ignore[misc,assignment]
from data_corpus import (  # noqa: E402
    DAMAGES,
    copy_of,
    damage_cache_entry,
    nifti_pair,
    tiny_synthetic,
)

Outcome = tuple[bool, str]


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``advseg ARGV`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            advseg_main(argv)
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
        except BaseException as exc:  # an escaped exception is a traceback for the user
            code = -1
            err.write(f"Traceback (escaped {type(exc).__name__}: {exc})\n")
    return code, out.getvalue(), err.getvalue()


def refused(argv: list[str], says: str, absent: Path | None = None) -> Outcome:
    """A refusal handled well: exit 2, one stderr line containing ``says``, ``absent`` absent."""
    code, out, err = run_cli(argv)
    lines = [line for line in err.splitlines() if line.strip()]
    if code != 2:
        return False, f"exit {code}: {(err or out).strip()[-300:]}"
    if len(lines) != 1 or "Traceback" in err:
        return False, f"{len(lines)} stderr lines: {err.strip()[:300]}"
    if says not in lines[0]:
        return False, f"line does not say {says!r}: {lines[0]}"
    if absent is not None and absent.exists():
        return False, f"{absent} was written"
    return True, lines[0]


class Campaign:
    def __init__(self, work: Path, verbose: bool) -> None:
        self.work, self.verbose = work, verbose
        self.results: list[tuple[str, str, bool, str]] = []
        self.synth = tiny_synthetic(work / "corpus", cases=3, scans=1, slices=4)
        self.corpus = tiny_synthetic(work / "one-scan", cases=1, scans=1, slices=4)  # as tests
        self._n = 0

    def fresh(self, name: str = "d") -> Path:
        self._n += 1
        return self.work / f"{name}{self._n}"

    def case(self, category: str, name: str, check: Callable[[], Outcome]) -> None:
        try:
            ok, detail = check()
        except BaseException as exc:
            ok, detail = False, f"campaign error {type(exc).__name__}: {exc}"
        self.results.append((category, name, ok, detail))
        if self.verbose or not ok:
            print(f"[{'ok ' if ok else 'BAD'}] {category}: {name}: {detail}", flush=True)

    def report(self) -> int:
        tried = Counter(c for c, *_ in self.results)
        good = Counter(c for c, _, ok, _ in self.results if ok)
        for category in tried:
            print(f"{category:<12} tried {tried[category]:>3}, handled well {good[category]:>3}")
        total, well = len(self.results), sum(good.values())
        print(f"tried {total}, handled well {well}, handled badly {total - well}")
        return 0 if total == well else 1


def _also(outcome: Outcome, text: str) -> Outcome:
    """A refusal whose line must also hold ``text`` (the file or row it names)."""
    ok, line = outcome
    if ok and text not in line:
        return False, f"does not name {text!r}: {line}"
    return outcome


def data_cases(c: Campaign) -> None:
    """The tests' corpus of broken Kaggle-layout data sets, through ``advseg data info``."""
    import test_data_errors as corpus

    for name, (breaker, extra) in corpus.BROKEN_INDEX.items():
        root = copy_of(c.corpus, c.fresh())
        where, what = breaker(root)
        extra = [a.format(day=corpus._day(root)) for a in extra]
        argv = ["data", "info", str(root), *extra]
        c.case("data", name, lambda a=argv, w=what, p=where: _also(refused(a, w), p))
    for name, breaker in corpus.BROKEN_SLICE.items():
        root = copy_of(c.corpus, c.fresh())
        where, what = breaker(root)
        argv = ["data", "info", str(root), "--check", "--size", "16"]
        c.case("data", name, lambda a=argv, w=what, p=where: _also(refused(a, w), p))

    rng = np.random.default_rng(0)
    for name, bad in (("nifti nan voxels", np.nan), ("nifti inf voxels", np.inf)):
        image, label = rng.random((8, 6, 3)).astype(np.float32), np.zeros((8, 6, 3), np.uint8)
        image[0, 0, 0] = bad
        root = nifti_pair(c.fresh(), image, label)
        argv = ["data", "info", str(root), "--labels", "1=organ", "--check"]
        c.case("data", name, lambda a=argv: refused(a, "1 of 144 voxels are not finite"))
    image, label = rng.random((8, 6, 3)).astype(np.float32), np.zeros((8, 6, 3), np.float32)
    label[1, 1, 1] = 1.4
    root = nifti_pair(c.fresh(), image, label)
    argv = ["data", "info", str(root), "--labels", "1=organ"]
    c.case("data", "nifti float labels", lambda: refused(argv, "non-integer labels"))


TRAIN_BAD = {
    "--lr nan": (["--lr", "nan"], "--lr: expected a finite number"),
    "--lr inf": (["--lr", "inf"], "--lr: expected a finite number"),
    "--lr -1": (["--lr", "-1"], "--lr: -1.0 must be > 0"),
    "--weight-decay nan": (["--weight-decay", "nan"], "--weight-decay: expected a finite"),
    "--epochs 0": (["--epochs", "0"], "--epochs: 0 must be >= 1"),
    "--batch-size 0": (["--batch-size", "0"], "--batch-size: 0 must be >= 1"),
    "--grad-accum 0": (["--grad-accum", "0"], "--grad-accum: 0 must be >= 1"),
    "--patience -1": (["--patience", "-1"], "--patience: -1 must be >= 0"),
    "--workers -1": (["--workers", "-1"], "--workers: -1 must be >= 0"),
    "--val-fraction 0": (["--val-fraction", "0"], "--val-fraction: 0.0 must lie in (0, 1)"),
    "--val-fraction 1": (["--val-fraction", "1"], "--val-fraction: 1.0 must lie in (0, 1)"),
    "--test-fraction nan": (["--test-fraction", "nan"], "--test-fraction: nan must lie"),
    "--device tpu": (["--device", "tpu"], "--device: 'tpu' is not a device"),
    "--precision fp8": (["--precision", "fp8"], "--precision: 'fp8' is not one of"),
    "--model nope": (["--model", "nope"], "nope"),
    "--loss nope": (["--loss", "nope"], "--loss: unknown loss 'nope'"),
    "--size 0": (["--size", "0"], "--size"),
}


def train_cases(c: Campaign) -> None:
    base = ["train", "--data", str(c.synth), "--size", "32", "--epochs", "1"]
    base += ["--model", "unet-tiny", "--test-fraction", "0.34", "--val-fraction", "0.5"]
    for name, (extra, says) in TRAIN_BAD.items():
        out = c.fresh("run")
        argv = [*_override(base, extra), "--out", str(out)]
        c.case("options", f"train {name}", lambda a=argv, s=says, o=out: refused(a, s, o))
    taken = c.fresh("file")
    taken.write_text("a file")
    for name, out in (("--out a file", taken), ("--out under a file", taken / "run")):
        argv = [*base, "--out", str(out)]
        c.case("outputs", f"train {name}", lambda a=argv: refused(a, "training output directory"))
    config = c.fresh("cfg").with_suffix(".yaml")
    config.write_text("lr: 0.1\nepochs: 1\nlr: 0.2\n")
    argv = [*base, "--out", str(c.fresh("run")), "--config", str(config)]
    c.case("yaml", "train --config repeated key", lambda: refused(argv, "key 'lr' repeated"))
    missing = [*base, "--out", str(c.fresh("run")), "--config", str(c.work / "nope.yaml")]
    c.case("yaml", "train --config missing", lambda: refused(missing, "nope.yaml: cannot read"))


def _override(base: list[str], extra: list[str]) -> list[str]:
    """``base`` with the options in ``extra`` replacing those of the same name."""
    out, skip = [], False
    names = set(extra[0::2])
    for i, arg in enumerate(base):
        if skip:
            skip = False
            continue
        if arg in names and i + 1 < len(base):
            skip = True
            continue
        out.append(arg)
    return out + extra


EXPERIMENT_BAD = {
    "steps -1": ("attacks:\n- name: pgd\n  kwargs: {steps: -1}\n", "steps"),
    "norm l3": ("attacks:\n- name: pgd\n  kwargs: {norm: l3}\n", "norm 'l3'"),
    "restarts 0": ("attacks:\n- name: pgd\n  kwargs: {restarts: 0}\n", "restarts"),
    "update foo": ("attacks:\n- name: fgsm\n  kwargs: {update: foo}\n", "update 'foo'"),
    "valid_range [1, 0]": ("attacks:\n- name: pgd\n  kwargs: {valid_range: [1, 0]}\n",
                           "valid_range"),
    "alpha nan": ("attacks:\n- name: pgd\n  kwargs: {alpha: .nan}\n", "alpha"),
    "eps inf": ("attacks:\n- name: fgsm\n  eps: [.inf]\n", "attacks[0].eps[0]"),
    "eps -1": ("attacks:\n- name: fgsm\n  eps: [-1]\n", "attacks[0].eps[0]"),
    "unknown attack option": ("attacks:\n- name: fgsm\n  kwargs: {stepz: 3}\n", "stepz"),
    "unknown loss": ("attacks:\n- name: fgsm\n  losses: [bcee]\n", "bcee"),
    "unknown device": ("train: {device: tpu}\n", "train.device: 'tpu'"),
    "cuda:7 without CUDA": ("train: {device: 'cuda:7'}\n", "train.device"),
    "bad exclusion list": ("data: {exclude: hosts}\n", "unknown list 'hosts'"),
    "bad exclusion id": ("data: {exclude: [case7]}\n", "'case7' is not a scan id"),
    "mistyped data path": ("data: {path: /nonexistent/uwmgi}\n", "no such data directory"),
    "missing checkpoint": ("models:\n- {arch: unet-tiny, checkpoint: /nonexistent/best}\n",
                           "checkpoint file not found"),
    "threshold 2.0": ("train: {threshold: 2.0}\n", "train.threshold: 2.0"),
    "lr nan": ("train: {lr: .nan}\n", "train.lr: expected a finite number"),
    "lr inf": ("train: {lr: .inf}\n", "train.lr: expected a finite number"),
    "examples -1": ("evaluation: {examples: -1}\n", "evaluation.examples: -1"),
    "batch_size 0": ("evaluation: {batch_size: 0}\n", "evaluation.batch_size: 0"),
    "repeated key": ("seed: 1\nseed: 2\n", "key 'seed' repeated"),
    "repeated nested key": ("train:\n  lr: 0.1\n  lr: 0.2\n", "key 'lr' repeated"),
    "split seed string": ("split: {seed: abc}\n", "split.seed: expected an integer"),
    "val_fraction 0": ("split: {val_fraction: 0}\n", "split.val_fraction"),
    "test_fraction nan": ("split: {test_fraction: .nan}\n", "split.test_fraction"),
    "unknown key": ("trian: {lr: 0.1}\n", "trian: unknown key"),
    "not a mapping": ("- 1\n- 2\n", "expected a mapping"),
    "syntax error": ("train: [1, 2\n", "line"),
}  # fmt: skip


def experiment_cases(c: Campaign) -> None:
    base = (
        "name: campaign\n"
        f"data: {{path: {c.synth}, cache_dir: {c.work / 'cache'}, preprocess: {{size: 32}}}}\n"
        "split: {test_fraction: 0.34, val_fraction: 0.5}\n"
        "models: [{arch: unet-tiny}]\n"
    )
    for name, (text, says) in EXPERIMENT_BAD.items():
        path = c.fresh("exp").with_suffix(".yaml")
        if text.startswith("data: {") and "path:" not in text:  # the data set stays given
            text = text.replace("data: {", f"data: {{path: {c.synth}, ", 1)
        lines = {line.split(":")[0]: line for line in base.splitlines()}
        merged = "\n".join(v for k, v in lines.items() if not text.startswith(k + ":")) + "\n"
        path.write_text(text if name in ("not a mapping", "syntax error") else merged + text)
        out = c.fresh("run")
        argv = ["run", str(path), "--out", str(out)]
        c.case("experiment", name, lambda a=argv, s=says, o=out: refused(a, s, o))
    taken = c.fresh("file")
    taken.write_text("a file")
    path = c.fresh("exp").with_suffix(".yaml")
    path.write_text(base)
    for name, out in (("--out a file", taken), ("--out under a file", taken / "run")):
        argv = ["run", str(path), "--out", str(out)]
        c.case("outputs", f"run {name}", lambda a=argv: refused(a, "run directory"))


def checkpoint_cases(c: Campaign) -> None:
    import json
    import pickle

    from advseg.models import create_model, metadata_for
    from advseg.models.checkpoint import save_checkpoint

    model = create_model("unet-tiny")
    folder = c.fresh("ckpt")
    good = folder / "good"
    save_checkpoint(good, model, metadata_for(model, ["large_bowel", "small_bowel", "stomach"]))

    def variant(name: str, edit: Callable[[dict], None]) -> Path:
        target = folder / name
        shutil.copy(f"{good}.safetensors", f"{target}.safetensors")
        document = json.loads(Path(f"{good}.json").read_text())
        edit(document)
        Path(f"{target}.json").write_text(json.dumps(document))
        return target

    cases = {
        "split_seed a string": (variant("a", lambda d: d["meta"]["data"].update(split_seed="x")),
                                "meta.data.split_seed"),
        "params a string": (variant("b", lambda d: d["meta"].update(params="many")),
                            "meta.params"),
        "unknown meta key": (variant("c", lambda d: d["meta"].update(colour="red")),
                             "meta.colour: unknown key"),
        "save_id differs": (variant("d", lambda d: d.update(save_id="other")),
                            "come from different saves"),
        "format missing": (variant("e", lambda d: d.pop("format")), "format is None"),
    }  # fmt: skip
    evil = folder / "model.pt"
    evil.write_bytes(pickle.dumps({"a": 1}))
    cases["a pickle file"] = (evil, "advseg never unpickles")
    cases["missing"] = (folder / "nope", "checkpoint file not found")
    for name, (path, says) in cases.items():
        out = c.fresh("eval")
        argv = ["evaluate", str(path), "--out", str(out), "--split", "all"]
        argv += ["--data", str(c.synth), "--device", "cpu"]
        c.case("checkpoint", name, lambda a=argv, s=says, p=path: _also(refused(a, s), p.name))
    base = ["evaluate", f"{good}", "--split", "all", "--data", str(c.synth), "--device", "cpu"]
    for name, (extra, says) in {
        "--examples -1": (["--examples", "-1"], "--examples: -1"),
        "--batch-size 0": (["--batch-size", "0"], "--batch-size: 0"),
        "--eps nan": (["--eps", "nan"], "eps"),
        "--device tpu": (["--device", "tpu"], "'tpu' is not a device"),
    }.items():
        out = c.fresh("eval")
        argv = [*_override(base, extra), "--out", str(out)]
        c.case("options", f"evaluate {name}", lambda a=argv, s=says: refused(a, s))
    taken = c.fresh("file")
    taken.write_text("a file")
    argv = [*base, "--out", str(taken / "x")]
    c.case("outputs", "evaluate --out under a file", lambda: refused(argv, str(taken)))


def records_cases(c: Campaign) -> None:
    import pandas as pd

    from advseg.runs.records import RECORD_COLUMNS, write_records

    run = c.fresh("records")
    row = {k: 0 for k in RECORD_COLUMNS}
    row.update(
        model="m",
        source="m",
        arch="unet",
        attack="fgsm",
        loss="bce",
        slice_id="case1_day0_slice_0001",
    )
    row.update({"scan": "case1_day0", "class": "stomach", "dice_clean": 0.9, "dice_adv": 0.5})
    write_records(pd.DataFrame([row]), run / "records" / "cell.parquet")
    shutil.copy(run / "records" / "cell.parquet", run / "records" / "cell-copy.parquet")
    c.case("records", "a copied records file", lambda: refused(["report", str(run)], "repeat"))
    broken = c.fresh("records")
    write_records(pd.DataFrame([row]), broken / "records" / "cell.parquet")
    data = (broken / "records" / "cell.parquet").read_bytes()
    (broken / "records" / "cell.parquet").write_bytes(data[: len(data) // 2])
    c.case("records", "a truncated records file",
           lambda: refused(["report", str(broken)], "not a complete Parquet"))  # fmt: skip


def issue25_cases(c: Campaign) -> None:
    """Issue 25's families (one case each, more in the tests/test_faults_*.py files): a records
    file that cannot be right, a damaged checkpoint, seeds and counts out of range, options that
    do nothing, hostile sizes and nesting, names that escape, and a directory already written."""
    import json
    import socket
    import subprocess

    import pandas as pd
    import torch

    from advseg.models import create_model, metadata_for
    from advseg.models.checkpoint import save_checkpoint
    from advseg.runs.records import RECORD_COLUMNS, write_records

    row = {k: 0 for k in RECORD_COLUMNS}
    row.update(model="m", source="m", arch="unet", attack="fgsm", loss="bce",
               slice_id="case1_day0_slice_0001", scan="case1_day0", dice_clean=0.9)  # fmt: skip
    row.update({"class": "stomach", "dice_adv": 7.0})
    run = c.fresh("records")
    write_records(pd.DataFrame([row]), run / "records" / "cell.parquet")
    c.case("issue25", "records with Dice 7", lambda: refused(["report", str(run)], "dice_adv 7"))
    row.update({"dice_adv": 0.5, "gt_pixels": -4})
    negative = c.fresh("records")
    write_records(pd.DataFrame([row]), negative / "records" / "cell.parquet")
    c.case("issue25", "records with negative pixel counts",
           lambda: refused(["report", str(negative)], "gt_pixels -4"))  # fmt: skip

    folder = c.fresh("ckpt")
    model = create_model("unet-tiny")
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(float("nan"))
    meta = metadata_for(model, ["large_bowel", "small_bowel", "stomach"])
    save_checkpoint(folder / "nan", model, meta)
    argv = ["evaluate", str(folder / "nan"), "--split", "all", "--data", str(c.synth)]
    argv += ["--device", "cpu", "--out", str(c.fresh("eval"))]
    c.case("issue25", "all-NaN weights", lambda: refused(argv, "not finite numbers"))
    bad = json.loads((folder / "nan.json").read_text())
    bad["meta"]["data"]["split"] = {"cases": {"train": [1], "val": [2], "test": []}}
    (folder / "split.json").write_text(json.dumps(bad))
    shutil.copy(folder / "nan.safetensors", folder / "split.safetensors")
    argv = ["evaluate", str(folder / "split"), "--data", str(c.synth), "--device", "cpu"]
    argv += ["--out", str(c.fresh("eval"))]
    c.case("issue25", "checkpoint split without test cases",
           lambda: refused(argv, "split.cases.test: no held-out case"))  # fmt: skip

    ckpt, tmp = str(folder / "nan"), c.fresh("out")
    for name, argv, says in [
        ("train --seed -1", ["train", "--data", str(c.synth), "--out", str(tmp), "--seed", "-1"],
         "--seed: -1 is not a seed"),
        ("train --split-seed 2**64+1", ["train", "--data", str(c.synth), "--out", str(tmp),
                                        "--split-seed", str(2**64 + 1)], "--split-seed: 1844"),
        ("certify --seed -1", ["certify", ckpt, "--out", str(tmp), "--seed", "-1"], "--seed: -1"),
        ("certify --n 2**40", ["certify", ckpt, "--out", str(tmp), "--n", str(2**40)],
         "--n: 1099511627776 must lie in"),
        ("certify --batch-size 0", ["certify", ckpt, "--out", str(tmp), "--batch-size", "0"],
         "--batch-size: 0 must lie in"),
        ("export --seed -1", ["export", str(run), "--seed", "-1"], "--seed: -1 is not a seed"),
        ("data synth --seed -1", ["data", "synth", "--out", str(tmp), "--seed", "-1"],
         "--seed: -1 is not a seed"),
        ("train --adv-eps alone", ["train", "--data", str(c.synth), "--out", str(tmp),
                                   "--adv-eps", "0.03"], "--adv-eps: does nothing without"),
        ("train --adv-steps alone", ["train", "--data", str(c.synth), "--out", str(tmp),
                                     "--adv-steps", "3"], "--adv-steps: does nothing without"),
        ("evaluate random_start=maybe", ["evaluate", ckpt, "--out", str(tmp), "--attack", "pgd",
                                         "--attack-option", "random_start=maybe"],
         "random_start: expected true or false"),
        ("evaluate seed=abc", ["evaluate", ckpt, "--out", str(tmp), "--attack", "pgd",
                               "--attack-option", "seed=abc"], "seed: expected a whole-number"),
        ("evaluate loss_kwargs=[1,2]", ["evaluate", ckpt, "--out", str(tmp), "--attack", "pgd",
                                        "--attack-option", "loss_kwargs=[1,2]"],
         "loss_kwargs: expected a mapping"),
    ]:  # fmt: skip
        c.case("issue25", name, lambda a=argv, s=says: refused(a, s, tmp))

    for name, text, says in [
        (
            "YAML nested 100,000 deep",
            "models: " + "[" * 100_000 + "]" * 100_000 + "\n",
            "nested more than 64 levels deep",
        ),
        ("YAML name ../escape", "name: ../escape\n", "is not a file name"),
        ("YAML name ''", "name: ''\n", "an empty name"),
        ("YAML seeds [-1]", "seeds: [-1]\n", "seeds[0]: -1 is not a seed"),
        ("YAML split.seed 2**64+1", f"split:\n  seed: {2**64 + 1}\n", "split.seed: 1844"),
    ]:
        experiment = c.fresh("exp").with_suffix(".yaml")
        experiment.write_text(f"data:\n  path: {c.synth}\n" + text)
        out = c.fresh("run")
        argv = ["run", str(experiment), "--out", str(out)]
        c.case("issue25", name, lambda a=argv, s=says, o=out: refused(a, s, o))

    root = copy_of(c.corpus, c.fresh())
    png = next(root.rglob("*.png"))
    width, height = (int(v) for v in png.name.split("_")[2:4])
    header = png.read_bytes()
    png.write_bytes(header[:16] + (40000).to_bytes(4, "big") * 2 + header[24:])
    argv = ["data", "info", str(root), "--check", "--size", "16"]
    c.case("issue25", "PNG declaring 40000x40000", lambda: refused(argv, "image is 40000x40000"))
    jpeg = copy_of(c.corpus, c.fresh())
    png = next(jpeg.rglob("*.png"))
    import cv2

    png.write_bytes(cv2.imencode(".jpg", np.zeros((height, width), np.uint8))[1].tobytes())
    argv = ["data", "info", str(jpeg), "--check", "--size", "16"]
    c.case("issue25", "JPEG named .png", lambda: refused(argv, "a JPEG, lossy, named .png"))

    rng = np.random.default_rng(0)
    for name, value in (("NIfTI label -1", -1.0), ("NIfTI label 1e20", 1e20)):
        image, label = rng.random((8, 6, 3)).astype(np.float32), np.zeros((8, 6, 3), np.float32)
        label[1, 1, 1] = value
        root = nifti_pair(c.fresh(), image, label)
        argv = ["data", "info", str(root), "--labels", "1=organ"]
        c.case("issue25", name, lambda a=argv: refused(a, "labels outside 0..65535"))
    image = (rng.random((8, 6, 3)) + 1j).astype(np.complex64)
    root = nifti_pair(c.fresh(), image, np.zeros((8, 6, 3), np.uint8))
    argv = ["data", "info", str(root), "--labels", "1=organ"]
    c.case("issue25", "NIfTI complex64 image", lambda: refused(argv, "complex numbers"))
    root = nifti_pair(c.fresh(), rng.random((8, 6, 3)).astype(np.float32),
                      np.zeros((8, 6, 3), np.uint8))  # fmt: skip
    (root / "dataset.json").write_bytes('{"labels": {"1": "f\xe9mur"}}'.encode("latin-1"))
    argv = ["data", "info", str(root)]
    c.case("issue25", "dataset.json in Latin-1", lambda: refused(argv, "not UTF-8 text"))

    locked = c.fresh("eval")
    locked.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    (locked / ".advseg.lock").write_text(f"{holder.pid} {socket.gethostname()} advseg evaluate\n")
    argv = ["evaluate", ckpt, "--out", str(locked), "--split", "all", "--data", str(c.synth)]
    try:
        c.case("issue25", "a second evaluate on one --out",
               lambda: refused(argv, "another advseg process is writing here"))  # fmt: skip
    finally:
        holder.kill()
        holder.wait()

    orphan = c.fresh("run")
    write_records(pd.DataFrame([{**row, "gt_pixels": 0}]), orphan / "records" / "cell.parquet")
    experiment = c.fresh("exp").with_suffix(".yaml")
    experiment.write_text(f"data:\n  path: {c.synth}\nmodels:\n  - arch: unet-tiny\n")
    argv = ["run", str(experiment), "--out", str(orphan)]
    c.case("issue25", "a run whose config.yaml was deleted",
           lambda: refused(argv, "holds finished work but no config.yaml"))  # fmt: skip


def issue25_output_cases(c: Campaign) -> None:
    """Issue 25's second stop: output faults and what a refusal leaves (empty and non-UTF-8
    arguments, --overwrite over a user's directory, full disks in data synth and a report, a
    cache directory that is a file), imagenet weights offline, a gzip bomb under the size limit,
    records of another evaluation copied into a run directory."""
    import json
    import pathlib
    from unittest import mock

    import pandas as pd

    from advseg.runs.records import RECORD_COLUMNS, write_records

    def patched(target: str, replacement, argv: list[str], says: str, absent: Path | None = None):
        def check() -> Outcome:
            with mock.patch(target, replacement):
                return refused(argv, says, absent)

        return check

    def offline(address, *args, **kwargs):
        raise OSError(101, "Network is unreachable")

    hub = c.fresh("hub")
    out = c.fresh("run")
    argv = ["train", "--data", str(c.synth), "--out", str(out), "--size", "32", "--epochs", "1",
            "--model", "smp:Unet:resnet18", "--encoder-weights", "imagenet"]  # fmt: skip

    def imagenet() -> Outcome:
        with mock.patch("huggingface_hub.constants.HF_HUB_CACHE", str(hub)):
            return patched("socket.create_connection", offline, argv, "cannot be reached", out)()

    c.case("issue25", "--encoder-weights imagenet offline", imagenet)

    for name, argv, says in [
        ("evaluate --out ''", ["evaluate", "ck", "--out", ""], "--out: an empty value"),
        ("evaluate --out=", ["evaluate", "ck", "--out="], "--out: an empty value"),
        ("a non-UTF-8 path", ["data", "info", str(c.work / os.fsdecode(b"caf\xe9"))],
         "is not UTF-8 text"),
    ]:  # fmt: skip
        c.case("issue25", name, lambda a=argv, s=says: refused(a, s))

    mine = c.fresh("mine")
    mine.mkdir()
    (mine / "thesis.tex").write_text("months of work")
    argv = ["data", "synth", "--out", str(mine), "--overwrite", "--cases", "2"]

    def overwrite() -> Outcome:
        outcome = refused(argv, "replaces only a synthetic data set advseg wrote")
        kept = [p.name for p in mine.iterdir()] == ["thesis.tex"]
        return outcome if kept or not outcome[0] else (False, "the user's file is gone")

    c.case("issue25", "data synth --overwrite over a user's directory", overwrite)

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    synth = c.fresh("synth")
    argv = ["data", "synth", "--out", str(synth), "--cases", "2", "--scans", "1", "--slices", "2"]

    def synth_full() -> Outcome:
        outcome = patched("pathlib.Path.write_bytes", full, argv, "no space left", synth)()
        debris = [p.name for p in synth.parent.glob(f".{synth.name}.*")]
        return outcome if not debris else (False, f"left {debris}")

    c.case("issue25", "a full disk during data synth", synth_full)

    taken = c.fresh("file")
    taken.write_text("a file")
    experiment = c.fresh("exp").with_suffix(".yaml")
    experiment.write_text(f"data: {{path: {c.synth}, cache_dir: {taken}}}\n"
                          "models: [{arch: unet-tiny}]\n")  # fmt: skip
    out = c.fresh("run")
    argv = ["run", str(experiment), "--out", str(out)]
    c.case("issue25", "run --cache-dir naming a file",
           lambda: refused(argv, "the cache directory is a file", out))  # fmt: skip

    row = {k: 0 for k in RECORD_COLUMNS}
    row.update(model="m", source="m", arch="unet", attack="fgsm", loss="bce",
               slice_id="case1_day0_slice_0001", scan="case1_day0", dice_clean=0.9,
               dice_adv=0.5, **{"class": "stomach"})  # fmt: skip
    run = c.fresh("records")
    write_records(pd.DataFrame([row]), run / "records" / "cell.parquet", {"run": "aaaa"})
    (run / "run.json").write_text(json.dumps({"config": "aaaa"}))
    report = run / "report"
    real_write = pathlib.Path.write_text
    count = [0]

    def fills_up(self, *args, **kwargs):
        count[0] += 1
        if count[0] > 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(self, *args, **kwargs)

    def report_full() -> Outcome:
        outcome = patched("pathlib.Path.write_text", fills_up, ["report", str(run)],
                          "no space left", report)()  # fmt: skip
        debris = [p.name for p in run.iterdir() if p.name not in ("records", "run.json")]
        return outcome if not debris else (False, f"left {debris}")

    c.case("issue25", "a full disk part-way through a report", report_full)

    foreign = c.fresh("records")
    write_records(pd.DataFrame([row]), foreign / "records" / "cell.parquet", {"run": "bbbb"})
    ours = c.fresh("records")
    write_records(pd.DataFrame([{**row, "eps": 0.5}]), ours / "records" / "cell2.parquet",
                  {"run": "aaaa", "cell": "cell2"})  # fmt: skip
    (ours / "run.json").write_text(json.dumps({"config": "aaaa"}))
    shutil.copy(foreign / "records" / "cell.parquet", ours / "records" / "cell.parquet")
    c.case("issue25", "another evaluation's records copied in",
           lambda: refused(["report", str(ours)], "records of another run"))  # fmt: skip

    import nibabel as nib

    zeros = np.zeros((128, 128, 128), np.uint8)
    bomb = nifti_pair(c.fresh(), zeros, zeros)
    nib.save(nib.Nifti1Image(zeros, np.eye(4)), bomb / "labelsTr" / "vol_001.nii.gz")
    argv = ["data", "info", str(bomb), "--labels", "1=organ"]
    c.case("issue25", "a gzip bomb under the 4 GiB limit",
           patched("advseg.data.nifti.available_memory", lambda: 2**20, argv,
                   "more than the 0.00 GiB of memory available now"))  # fmt: skip


def cache_cases(c: Campaign) -> None:
    for how in DAMAGES:

        def check(how: str = how) -> Outcome:
            root = copy_of(c.synth, c.fresh())
            config = DataConfig(path=root, cache_dir=root / "cache",
                                preprocess=PreprocessConfig(size=16))  # fmt: skip
            first = load_data(config)
            expected = np.array(first.images)
            damage_cache_entry(first.cache_path, how)
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                again = load_data(config)
            said = [w for w in seen if issubclass(w.category, AdvsegWarning)]
            if not said:
                return False, "no warning"
            if not np.array_equal(np.asarray(again.images), expected):
                return False, "rebuilt arrays differ"
            return True, str(said[0].message)

        c.case("cache", how, check)


def disk_cases(c: Campaign) -> None:
    """Full disk and read-only file system at each kind of write, simulated by the OSError."""
    import pandas as pd

    from advseg.atomic import write_text_atomic
    from advseg.errors import UserError
    from advseg.models import create_model, metadata_for
    from advseg.models.checkpoint import read_checkpoint, save_checkpoint
    from advseg.runs.records import RECORD_COLUMNS, write_records

    model = create_model("unet-tiny")
    meta = metadata_for(model, ["a", "b", "c"])
    row = {k: 0 for k in RECORD_COLUMNS}
    row.update(
        model="m", arch="u", attack="fgsm", loss="bce", slice_id="s", scan="s", **{"class": "c"}
    )

    def writes(kind: str, folder: Path) -> None:
        if kind == "checkpoint":
            save_checkpoint(folder / "last", model, meta)
        elif kind == "records":
            write_records(pd.DataFrame([row]), folder / "records" / "cell.parquet")
        elif kind == "text":
            write_text_atomic(folder / "summary.csv", "a,b\n")
        elif kind == "cache":
            root = copy_of(c.synth, folder / "d")
            load_data(
                DataConfig(
                    path=root, cache_dir=root / "cache", preprocess=PreprocessConfig(size=16)
                )
            )

    for code, said in ((errno.ENOSPC, "no space left"), (errno.EROFS, "read-only")):
        for kind in ("checkpoint", "records", "text", "cache"):

            def check(kind: str = kind, code: int = code, said: str = said) -> Outcome:
                folder = c.fresh("disk")
                folder.mkdir()
                if kind == "checkpoint":
                    save_checkpoint(folder / "last", model, meta)  # a previous save to keep
                with _failing_writes(code, kind):
                    try:
                        writes(kind, folder)
                    except UserError as err:
                        message = str(err)
                    else:
                        return False, "no error"
                if said not in message or "\n" in message:
                    return False, message
                leftovers = [p.name for p in folder.rglob("*.tmp")]
                if leftovers:
                    return False, f"left {leftovers}"
                if kind == "checkpoint":
                    read_checkpoint(folder / "last")  # the previous save still reads
                return True, message

            c.case("disk", f"{kind}: {os.strerror(code)}", check)


@contextlib.contextmanager
def _failing_writes(code: int, kind: str):
    """Make the write of ``kind`` fail with ``code`` where its bytes go to the disk."""
    from unittest import mock

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    target = {
        "checkpoint": "advseg.models.checkpoint.save_file",
        "records": "pyarrow.parquet.write_table",  # advseg.runs.records writes through pyarrow
        "text": "pathlib.Path.write_text",
        "cache": "advseg.data.cache.os.posix_fallocate",
    }[kind]
    with mock.patch(target, fail):
        yield


def kill_cases(c: Campaign) -> None:
    """The tests' kill instants, each a training subprocess ended by ``ADVSEG_FAULT``."""
    import torch

    import test_fault_kills as kills
    from advseg.models.checkpoint import read_checkpoint

    reference = c.fresh("full")
    kills._resume(reference)
    expected = read_checkpoint(reference / "checkpoints" / "last")[0]
    for param in kills.POINTS:
        fault, _ = param.values

        def check(fault: str = fault) -> Outcome:
            out = c.fresh("kill")
            killed = kills._train(out, fault)
            if killed.returncode != 137:
                return False, f"not killed: {killed.returncode} {killed.stderr[-200:]}"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", AdvsegWarning)
                kills._resume(out)
                weights, meta, _ = read_checkpoint(out / "checkpoints" / "last")
            same = all(torch.equal(weights[k], v) for k, v in expected.items())
            debris = [p.name for p in out.rglob("*.tmp")]
            if not same or debris:
                return False, f"same weights {same}, debris {debris}"
            return True, f"resumed to epoch {meta.epoch}, identical weights"

        c.case("kill", fault, check)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", action="store_true", help="also kill training subprocesses")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        campaign = Campaign(Path(tmp), args.verbose)
        for cases in (data_cases, train_cases, experiment_cases, checkpoint_cases,
                      records_cases, cache_cases, disk_cases, issue25_cases,
                      issue25_output_cases):  # fmt: skip
            cases(campaign)
        if args.kills:
            kill_cases(campaign)
        code = campaign.report()
    sys.exit(code)


if __name__ == "__main__":
    os.environ.setdefault("COLUMNS", "400")  # one line stays one line in the captured stderr
    main()
