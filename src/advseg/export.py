"""Export one cell's adversarial images and predictions for chosen slices (``advseg export``).

Where the images come from. A run keeps numbers, not images: ``records/`` holds counts per
(slice, class), ``examples/`` a few slices per cell for the report, ``adversarial/`` only the
images of transfer sources. So the export recomputes them, the one honest way that covers any
slice: it loads the cell's checkpoint and the data that checkpoint was trained on (as
``advseg evaluate`` does), and runs the evaluation engine itself
(:func:`advseg.evaluate.evaluate_cell` with the cell's attack, loss, eps and the run's attack
options) on the chosen slices. Then it checks the result against the run: each slice's clean
and adversarial pixel counts are compared with its records, and the comparison is written
(``export.json``) and summed up in one line. A deterministic attack (FGSM) on the same kind of
device reproduces the evaluated images. An attack with random starts (PGD, APGD, ...) seeds
them per batch number (:func:`advseg.evaluate.engine.draw_seed`), so the export runs the very
batches that held the chosen slices, numbered as in the evaluation (``only_batches``), with the
batch size, seed and attack options of the run's ``config.yaml`` or of an ``advseg evaluate``
output's ``evaluate.yaml``, and reproduces the evaluated images. An older evaluate output has
neither: there a random start is a seeded draw of the same attack, and the comparison says how
far its Dice lies from the records'. Targeted (``:erase=``) and notebook cells are rebuilt too.

What is written, under ``OUT`` (default ``RUN_DIR/export/<cell>__<loss>/``):

- ``png/<slice id>/``: ``image.png``, ``adversarial.png`` (the model's input, grey, [0, 1] as
  0-255, centre channel), ``perturbation.png`` (x_adv - x mapped from [-eps, eps] to 0-255,
  128 = unchanged), and per class ``truth_<class>.png``, ``clean_<class>.png``,
  ``adversarial_<class>.png`` (0 / 255), all at the model's resolution.
- for slices read from NIfTI volumes, ``nifti/<scan>_{image,adversarial}.nii.gz`` (float32, the
  model-input intensities in [0, 1]) and
  ``nifti/<scan>_{truth,clean,adversarial}_mask.nii.gz`` (uint8, one volume per class along a
  fourth axis): the source volume's canonical (RAS+) grid and affine, each exported slice put
  back at its place (padding cut, resized to the source slice by nearest neighbour), every
  other slice 0. And ``nifti/<scan>_adversarial_source.nii.gz``: the whole source volume in its
  own units (float32, e.g. HU), each exported slice with the perturbation added: ``x_adv - x``
  of the centre channel put back by nearest neighbour and scaled by the slice's intensity range
  (:func:`advseg.data.intensity_range`), so every voxel moves by at most eps times that range.
  The adversarial example itself is the model-sized image: preprocessing this volume again
  resamples the perturbation and clips negative values, so it gives an image near to it, not
  equal to it; for viewing beside the source in its units.
- ``export.json``: the cell, the slices, where each file is, and the check against the records.

A model advseg did not train (``--nnunet``, ``--bundle``: named in the run's ``external.json``) is
opened again from the run's ``evaluate.yaml``, and its chosen volumes are written as NIfTI on each
source volume's own grid, in its units (:mod:`advseg.evaluate.external_export`).
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from advseg.atomic import check_output_dir, write_bytes_atomic, write_text_atomic
from advseg.errors import UserError
from advseg.runs.records import read_records

COUNTS = ["tp_clean", "fp_clean", "fn_clean", "tp_adv", "fp_adv", "fn_adv"]


@dataclass
class ExportResult:
    """What :func:`export_cell` wrote.

    Attributes:
        out: the export folder; files: every file written.
        cell: model, attack, eps, loss (and the training seed in a grid with seeds).
        slices: the exported slice ids.
        check: per slice, the recorded and recomputed clean / adversarial Dice (mean over its
            classes) and ``same_counts`` (every pixel count equal to the records').
    """

    out: Path
    cell: dict[str, Any]
    slices: list[str]
    check: pd.DataFrame
    files: list[Path] = field(default_factory=list)

    @property
    def reproduced(self) -> int:
        """How many slices give exactly the records' pixel counts."""
        return int(self.check["same_counts"].sum())


def _pick(frame: pd.DataFrame, column: str, value: Any, option: str) -> pd.DataFrame:
    values = list(dict.fromkeys(frame[column].tolist()))
    if value is None:
        if len(values) == 1:
            return frame
        listed = ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)
        raise UserError(f"{option}: the run has several ({listed}); choose one")
    if column == "eps":
        match = frame[np.isclose(frame["eps"].astype(float), float(value), rtol=0, atol=1e-12)]
    else:
        match = frame[frame[column].astype(str) == str(value)]
    if match.empty:
        listed = ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)
        raise UserError(f"{option} {value}: not in the run's records (it has {listed})")
    return match


def choose_cell(
    records: pd.DataFrame,
    model: str | None = None,
    attack: str | None = None,
    eps: float | None = None,
    loss: str | None = None,
    train_seed: int | None = None,
) -> pd.DataFrame:
    """The white-box records of one (model, attack, eps, loss[, seed]); a choice left None must
    be the only one the run has.

    Raises:
        UserError: a value not in the records (naming those there), or an open choice.
    """
    frame = records[records["source"] == records["model"]] if "source" in records else records
    frame = _pick(frame, "model", model, "--model")
    frame = _pick(frame, "attack", attack, "--attack")
    frame = _pick(frame, "eps", eps, "--eps")
    frame = _pick(frame, "loss", loss, "--loss")
    if "seed" in frame.columns:
        frame = _pick(frame, "seed", train_seed, "--train-seed")
    return frame


def choose_slices(
    cell: pd.DataFrame, slice_ids: list[str] | None, count: int, seed: int
) -> list[str]:
    """The slices to export: ``slice_ids`` as given (each must be in the cell), else ``count``
    of the cell's slices, a seeded draw spread over the cases, in the records' order."""
    from advseg.data.split import spread_positions

    evaluated = cell.drop_duplicates("slice_id")
    if slice_ids:
        known = set(evaluated["slice_id"])
        missing = [s for s in slice_ids if s not in known]
        if missing:
            raise UserError(
                f"--slices: {', '.join(missing)} not evaluated in this cell "
                f"(it has {len(known)} slices, e.g. {evaluated['slice_id'].iloc[0]})"
            )
        return list(dict.fromkeys(slice_ids))
    if count < 1:
        raise UserError(f"--count: {count} must be at least 1")
    picked = spread_positions(evaluated["case"].to_numpy(), count, seed)
    return evaluated["slice_id"].iloc[picked].tolist()


def _run_config(run_dir: Path) -> dict[str, Any]:
    """The settings of ``run_dir`` in ``advseg run``'s ``config.yaml`` form: the run's own, or
    an ``advseg evaluate`` output's ``evaluate.yaml`` put in that form (its checkpoints as the
    models, its attack options as each attack's kwargs); ``{}`` for an output with neither."""
    from advseg.attacks import attack_options
    from advseg.config import load_yaml
    from advseg.evaluate.command import SETTINGS_FILE
    from advseg.train.trained import checkpoint_label

    if (run_dir / "config.yaml").is_file():
        return load_yaml(run_dir / "config.yaml") or {}
    if not (run_dir / SETTINGS_FILE).is_file():
        return {}
    settings = load_yaml(run_dir / SETTINGS_FILE) or {}
    options = settings.get("attack_options") or {}
    return {
        "seed": int(options.get("seed", 0)),  # an attack's default seed, as evaluate left it
        "models": [{"name": checkpoint_label(c), "checkpoint": c}
                   for c in settings.get("checkpoints") or []],
        "attacks": [{"name": name, "losses": settings.get("losses"), "eps": settings.get("eps"),
                     "kwargs": {k: v for k, v in options.items() if k in attack_options(name)}}
                    for name in settings.get("attacks") or []],
        "evaluation": {"batch_size": settings.get("batch_size")},
    }  # fmt: skip


def locate_checkpoint(run_dir: Path, model: str, seed: int | None, config: dict) -> Path:
    """The checkpoint of a run's model: its ``checkpoint`` in ``config.yaml``, else the one
    trained in ``models/<model>/[seed<k>/]checkpoints/best``.

    Raises:
        UserError: none is found (an ``advseg evaluate`` output: pass ``--checkpoint``).
    """
    from advseg.models.checkpoint import checkpoint_exists

    for spec in config.get("models") or []:
        name = spec.get("name") or spec.get("arch")
        if name == model and spec.get("checkpoint"):
            return Path(spec["checkpoint"])
    seeded = bool(config.get("seeds")) and seed is not None
    folder = run_dir / "models" / model / (f"seed{seed}" if seeded else "")
    best = folder / "checkpoints" / "best"
    if not checkpoint_exists(best):
        raise UserError(
            f"{run_dir}: no checkpoint of model {model} in the run (looked for {best}); pass "
            "--checkpoint PATH (an advseg evaluate output does not keep its checkpoints)"
        )
    return best


def attack_settings(label: str, config: dict, eps: float, loss: str) -> dict[str, Any]:
    """How the cell's attack was built: ``attack`` (registry name), ``compat``, ``erase`` (the
    classes of a targeted ``:erase=`` label), ``kwargs`` (the run's ``seed`` and its
    ``attacks`` entry that lists this eps and loss) and ``batch_size`` (the run's evaluation
    batch size); outside a run (an ``advseg evaluate`` output keeps no config) the defaults and
    ``batch_size`` None.

    Raises:
        UserError: an adaptive (``+bpda``, ``+eot``) label, which export cannot rebuild, or a
            corruption cell's (no attack to rebuild).
    """
    from advseg.corruptions import corruption_of
    from advseg.experiment.config import EvaluationSpec

    if corruption_of(label) is not None:  # no attack to rebuild: the TorchIO draw is its image
        raise UserError(
            f"--attack {label}: a corruption cell; export rebuilds attack cells "
            "(advseg.corruptions.corrupt with the run's seed gives its images)"
        )
    name, compat, erase = label, "none", []
    if label.endswith(":notebook"):
        name, compat = label[: -len(":notebook")], "notebook"
    if ":erase=" in name:
        name, classes = name.split(":erase=", 1)
        erase = classes.split("+")
    if ":" in name or "+" in name:
        raise UserError(
            f"--attack {label}: export rebuilds plain, targeted and notebook attacks only (not "
            "adaptive ones)"
        )
    kwargs: dict[str, Any] = {"seed": int(config.get("seed") or 0)} if config else {}
    for spec in config.get("attacks") or []:
        listed = [float(e) for e in spec.get("eps") or []]
        at_eps = not listed or any(abs(e - eps) < 1e-12 for e in listed)
        if spec.get("name") == name and loss in (spec.get("losses") or [loss]) and at_eps:
            kwargs.update(spec.get("kwargs") or {})
            break
    batch_size = None
    if config:
        evaluation = config.get("evaluation") or {}
        batch_size = int(evaluation.get("batch_size") or EvaluationSpec().batch_size)
    return {"attack": name, "compat": compat, "erase": erase, "kwargs": kwargs,
            "batch_size": batch_size}  # fmt: skip


def _grey_png(array: np.ndarray) -> bytes:
    """An ``(H, W)`` array in [0, 1] as an 8-bit grey PNG."""
    image = np.clip(np.rint(np.asarray(array, np.float64) * 255), 0, 255).astype(np.uint8)
    ok, encoded = cv2.imencode(".png", image)
    if not ok:  # pragma: no cover - cv2 encodes any uint8 image
        raise RuntimeError("PNG encoding failed")
    return encoded.tobytes()


def _nifti_bytes(volume: np.ndarray, affine: np.ndarray) -> bytes:
    """A gzip-compressed NIfTI-1 file of ``volume`` on ``affine``."""
    import nibabel as nib

    image = nib.Nifti1Image(volume, affine)
    image.header.set_xyzt_units("mm")
    return gzip.compress(image.to_bytes(), mtime=0)


def _check(cell: pd.DataFrame, again: pd.DataFrame, slices: list[str]) -> pd.DataFrame:
    """Per slice: recorded and recomputed mean Dice (clean, adversarial), counts identical."""
    keys = ["slice_id", "class"]
    old = cell.set_index(keys)[[*COUNTS, "dice_clean", "dice_adv"]]
    new = again.set_index(keys)[[*COUNTS, "dice_clean", "dice_adv"]].reindex(old.index)
    rows = []
    for slice_id in slices:
        a, b = old.loc[slice_id], new.loc[slice_id]
        rows.append({
            "slice_id": slice_id,
            "dice_clean_recorded": float(a["dice_clean"].mean()),
            "dice_clean_export": float(b["dice_clean"].mean()),
            "dice_adv_recorded": float(a["dice_adv"].mean()),
            "dice_adv_export": float(b["dice_adv"].mean()),
            "same_counts": bool((a[COUNTS].to_numpy() == b[COUNTS].to_numpy()).all()),
        })  # fmt: skip
    return pd.DataFrame(rows)


def export_cell(
    run_dir: str | Path,
    *,
    model: str | None = None,
    attack: str | None = None,
    eps: float | None = None,
    loss: str | None = None,
    train_seed: int | None = None,
    slices: list[str] | None = None,
    count: int = 4,
    seed: int = 0,
    out: str | Path | None = None,
    checkpoint: str | Path | None = None,
    data: Path | None = None,
    cache_dir: Path | None = None,
    device: str = "auto",
) -> ExportResult:
    """Recompute and write one cell's adversarial images and predictions (see the module).

    Args:
        run_dir: a run directory (``advseg run``, or an ``advseg evaluate`` output with
            ``checkpoint``).
        model, attack, eps, loss, train_seed: the cell; each may be left out when the run has
            one value.
        slices: slice ids to export; else ``count`` slices drawn with ``seed`` (spread over
            cases).
        out: the export folder (default ``run_dir/export/<cell>__<loss>``).
        checkpoint: the model's checkpoint (default: the run's).
        data, cache_dir: as ``advseg evaluate --data / --cache-dir`` (default: the data the
            checkpoint was trained on).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.

    Raises:
        UserError: an unknown or open cell choice, a slice not in the cell, no checkpoint, a
            model or attack export cannot rebuild, data that no longer holds a slice.
    """
    from advseg.data import intensity_range, load_data, restore_slice, saved_preprocess
    from advseg.data.nifti import canonical_geometry, read_volume
    from advseg.evaluate.cells import DEFAULT_BATCH_SIZE, evaluate_cell
    from advseg.evaluate.external_export import export_volumes, external_models
    from advseg.labels import checkpoint_activation
    from advseg.models.checkpoint import check_compatible, load_checkpoint
    from advseg.runs.names import file_stem
    from advseg.train import resolve_device
    from advseg.train.trained import trained_data_config

    run_dir = Path(run_dir)
    cell = choose_cell(read_records(run_dir), model, attack, eps, loss, train_seed)
    first = cell.iloc[0]
    name, label, loss, eps = (
        str(first["model"]),
        str(first["attack"]),
        str(first["loss"]),
        float(first["eps"]),
    )
    trained_seed = int(first["seed"]) if "seed" in cell.columns else None
    if "+" in name:
        raise UserError(f"--model {name}: a defended variant; export the model itself")
    chosen = choose_slices(cell, slices, count, seed)
    config = _run_config(run_dir)
    settings = attack_settings(label, config, eps, loss)
    cell_info = {"model": name, "attack": label, "eps": eps, "loss": loss}
    if trained_seed is not None:
        cell_info["train_seed"] = trained_seed
    stem = f"{file_stem(name)}__{file_stem(label)}__eps{eps:g}__{file_stem(loss)}"
    target = Path(out) if out is not None else run_dir / "export" / stem
    files: list[Path] = []

    def put(relative: str, payload: bytes) -> str:
        write_bytes_atomic(target / relative, payload)
        files.append(target / relative)
        return relative

    if name in external_models(run_dir):  # an nnU-Net folder or a bundle: whole volumes
        check_output_dir(target, "export folder")
        records, nifti, external = export_volumes(
            run_dir, cell, chosen, settings, put, data=data, device=resolve_device(device)
        )
        check = _check(cell, records, chosen)
        document = {"cell": cell_info, "external": external, "attack": settings, "nifti": nifti,
                    "how": "recomputed with advseg.evaluate.evaluate_cell on these volumes, "
                    "written on each source volume's grid in its units; 'check' compares each "
                    "volume's voxel counts with the run's records",
                    "check": check.to_dict(orient="records")}  # fmt: skip
        write_text_atomic(target / "export.json", json.dumps(document, indent=1) + "\n")
        return ExportResult(target, cell_info, chosen, check, [*files, target / "export.json"])
    path = (
        Path(checkpoint) if checkpoint else locate_checkpoint(run_dir, name, trained_seed, config)
    )
    net, meta = load_checkpoint(path, resolve_device(device))
    arch = str(first["arch"]) if "arch" in cell.columns else meta.model
    if arch != meta.model:  # another model would not reproduce the cell's records
        raise UserError(
            f"{path}: a {meta.model!r} model, but the cell's records were computed by a "
            f"{arch!r} model ({name}); pass that model's checkpoint"
        )
    preprocess = saved_preprocess(meta.preprocessing, f"{path} preprocessing")
    loaded = load_data(trained_data_config(meta.data, path, preprocess, data, cache_dir))
    check_compatible(meta, path, in_channels=preprocess.channels, classes=list(loaded.classes))
    row_of = pd.Series(np.arange(len(loaded.index)), index=loaded.index["id"].to_numpy())
    # A run's records list its slices in the order it attacked them: running the batches that
    # hold the chosen slices, numbered as then, draws the same random starts (draw_seed).
    batch_size = settings["batch_size"]
    evaluated = cell["slice_id"].drop_duplicates().tolist() if batch_size else chosen
    absent = [s for s in evaluated if s not in row_of.index]
    if absent:
        raise UserError(f"{', '.join(absent)}: not in the data set {loaded.location} (changed?)")
    rows = row_of.loc[evaluated].to_numpy()
    where = {s: i for i, s in enumerate(evaluated)}
    positions = [where[s] for s in chosen]
    kwargs = settings["kwargs"]
    kwargs["activation"] = checkpoint_activation(
        meta.activation, kwargs.get("activation"), str(path)
    )
    result = evaluate_cell(
        net, loaded, rows, settings["attack"], [loss], eps, model_name=name, arch=meta.model,
        attack_kwargs=kwargs, batch_size=batch_size or DEFAULT_BATCH_SIZE, examples=positions,
        only_batches=sorted({p // batch_size for p in positions}) if batch_size else None,
        erase=settings["erase"], compat=settings["compat"],
    )  # fmt: skip
    shown = result.examples  # every chosen slice: images, masks, predictions
    order = [list(shown["slice_ids"]).index(s) for s in chosen]
    check_output_dir(target, "export folder")

    classes = list(loaded.classes)
    listing: dict[str, dict[str, Any]] = {}
    volumes: dict[str, dict[str, Any]] = {}
    geometry = loaded.geometry
    for slice_id, i in zip(chosen, order, strict=True):
        image = shown["image"][i]  # (C, S, S)
        centre = image.shape[0] // 2
        grey, adv = image[centre], shown["x_adv"][0, i][centre]
        masks = {
            "truth": shown["mask"][i] > 0,
            "clean": shown["pred_clean"][i] > 0,
            "adversarial": shown["pred_adv"][0, i] > 0,
        }
        folder = f"png/{file_stem(slice_id)}"
        entry = {
            "image": put(f"{folder}/image.png", _grey_png(grey)),
            "adversarial": put(f"{folder}/adversarial.png", _grey_png(adv)),
            "perturbation": put(
                f"{folder}/perturbation.png", _grey_png(0.5 + (adv - grey) / (2 * eps or 1))
            ),
        }
        for kind, mask in masks.items():
            for k, cls in enumerate(classes):
                entry[f"{kind}_{cls}"] = put(f"{folder}/{kind}_{file_stem(cls)}.png",
                                              _grey_png(mask[k].astype(np.float32)))  # fmt: skip
        listing[slice_id] = entry
        meta_row = loaded.index.iloc[int(row_of[slice_id])]
        source = str(meta_row["image_path"])
        dicom = Path(source).is_dir()  # a DICOM series folder (advseg.data.dicom)
        if int(meta_row["image_z"]) >= 0 and (source.endswith((".nii", ".nii.gz")) or dicom):
            volume = volumes.setdefault(str(meta_row["scan"]), {"path": source, "slices": []})
            volume["slices"].append(
                (int(meta_row["image_z"]), int(row_of[slice_id]), grey, adv, masks)
            )
    nifti = {}
    for scan, volume in volumes.items():
        shape, affine = canonical_geometry(volume["path"])
        width, height, depth = shape[:3]  # canonical x (left-right) = slice width
        arrays = {
            "image": np.zeros((width, height, depth), np.float32),
            "adversarial": np.zeros((width, height, depth), np.float32),
            **{f"{k}_mask": np.zeros((width, height, depth, len(classes)), np.uint8)
               for k in ("truth", "clean", "adversarial")},
        }  # fmt: skip
        raw = read_volume(volume["path"])  # (H, W, Z), the source's units
        source_units = raw.transpose(1, 0, 2).astype(np.float32)
        scales = {}
        for z, row, grey, adv, masks in volume["slices"]:
            place = geometry.iloc[row]
            arrays["image"][:, :, z] = restore_slice(grey, place, height, width).T
            arrays["adversarial"][:, :, z] = restore_slice(adv, place, height, width).T
            low, high = intensity_range(raw[:, :, z], preprocess)
            delta = restore_slice((adv - grey).astype(np.float32), place, height, width)
            source_units[:, :, z] += (delta * max(high - low, 0.0)).T
            scales[z] = high - low
            for kind, mask in masks.items():
                back = restore_slice(mask, place, height, width)  # (K, H, W)
                arrays[f"{kind}_mask"][:, :, z, :] = back.transpose(2, 1, 0)
        arrays["adversarial_source"] = source_units
        series = []
        if Path(volume["path"]).is_dir():  # DICOM: the adversarial series, the source's header
            from advseg.data.dicom import from_canonical, write_series_like

            folder = target / "dicom" / file_stem(scan)
            back = from_canonical(source_units, volume["path"])
            series = write_series_like(volume["path"], back, folder)
            files.extend(series)
        nifti[scan] = {
            "source": volume["path"],
            "z": sorted(z for z, *_ in volume["slices"]),
            "source_units_per_input_unit": {str(z): scales[z] for z in sorted(scales)},
            **({"dicom": str((target / "dicom" / file_stem(scan)).relative_to(target))}
               if series else {}),
            **{kind: put(f"nifti/{file_stem(scan)}_{kind}.nii.gz", _nifti_bytes(a, affine))
               for kind, a in arrays.items()},
        }  # fmt: skip
    check = _check(cell, result.records, chosen)
    document = {
        "cell": cell_info,
        "checkpoint": str(path.resolve()),
        "data": str(loaded.location),
        "attack": settings,
        "classes": classes,
        "how": "recomputed with advseg.evaluate.evaluate_cell on these slices; 'check' compares "
        "each slice's pixel counts with the run's records",
        "slices": listing,
        "nifti": nifti,
        "check": check.to_dict(orient="records"),
    }
    write_text_atomic(target / "export.json", json.dumps(document, indent=1) + "\n")
    files.append(target / "export.json")
    return ExportResult(target, cell_info, chosen, check, files)
