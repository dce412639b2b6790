"""``advseg export`` of a 3D model's cell: whole volumes as NIfTI on the source grid.

A volume cell's records (``through`` set: :mod:`advseg.attacks.through`) name whole scans; the
export recomputes the chosen ones as :mod:`advseg.export` does for slices: the cell's checkpoint,
the volumes it was trained on (:func:`advseg.data.load_volumes`), the run's attack settings, the
same sliding window and threat protocol, each volume run as the evaluation's batch of the same
number (so random starts repeat), and checks the pixel counts against the records. Written
under ``OUT`` (default ``RUN_DIR/export/<cell>__<loss>/``):

- ``nifti/<scan>_image.nii.gz``, ``_adversarial.nii.gz`` (float32 model inputs: the normalised
  intensities), ``_perturbation_source.nii.gz`` (``x_adv - x`` times the volume's z-score
  deviation: in the source's units, e.g. HU) and ``_{truth,clean,adversarial}_mask.nii.gz``
  (uint8, one class per index of a fourth axis), on the source grid: resampled back to the
  source's voxels where ``data.volume.spacing`` resampled them (trilinear; masks per class
  trilinear >= 0.5), in the file's own orientation and affine (NIfTI; a DICOM series or a PNG
  stack: the canonical grid, the PNG stack's affine its spacing);
- ``export.json``: the cell, the volumes, the files and the check against the records.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from advseg.atomic import check_output_dir, write_bytes_atomic, write_text_atomic
from advseg.errors import UserError
from advseg.export import (
    ExportResult,
    _check,
    _nifti_bytes,
    _run_config,
    attack_settings,
    choose_cell,
    choose_slices,
    export_cell,
    locate_checkpoint,
)
from advseg.runs.records import read_records


def export_any(run_dir: str | Path, **options: Any) -> ExportResult:
    """:func:`export_volume_cell` when the chosen cell is a 3D model's (its records name a
    ``through``), else :func:`advseg.export.export_cell` (slices)."""
    keys = ("model", "attack", "eps", "loss", "train_seed")
    cell = choose_cell(read_records(Path(run_dir)), *(options.get(k) for k in keys))
    if "through" in cell.columns and str(cell["through"].iloc[0]):
        return export_volume_cell(run_dir, **options)
    return export_cell(run_dir, **options)


def export_volume_cell(
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
    """Recompute and write one volume cell's volumes (see the module); ``slices`` are scan
    ids (the records' ``slice_id``), else ``count`` of them drawn with ``seed``. The other
    arguments are :func:`advseg.export.export_cell`'s."""
    from advseg.data import load_volumes, saved_preprocess
    from advseg.evaluate.cells import evaluate_sweep
    from advseg.inference import SlidingWindow
    from advseg.labels import checkpoint_activation, class_prediction
    from advseg.models.checkpoint import load_checkpoint
    from advseg.models.zoo import resolve
    from advseg.runs.names import file_stem
    from advseg.train import resolve_device
    from advseg.train.trained import trained_data_config

    run_dir = Path(run_dir)
    cell = choose_cell(read_records(run_dir), model, attack, eps, loss, train_seed)
    first = cell.iloc[0]
    name, label, loss, eps = str(first["model"]), str(first["attack"]), str(first["loss"]),\
        float(first["eps"])  # fmt: skip
    through, nsd_mm = str(first["through"]), float(first["nsd_mm"])
    trained_seed = int(first["seed"]) if "seed" in cell.columns else None
    chosen = choose_slices(cell, slices, count, seed)
    config = _run_config(run_dir)
    settings = attack_settings(label.removesuffix(f":{through}"), config, eps, loss)
    path = Path(checkpoint) if checkpoint else locate_checkpoint(run_dir, name, trained_seed,
                                                                 config)  # fmt: skip
    net, meta = load_checkpoint(path, resolve_device(device))
    preprocess = saved_preprocess(meta.preprocessing, f"{path} preprocessing")
    data_config = trained_data_config(meta.data, path, preprocess, data, cache_dir)
    loaded = load_volumes(data_config)
    row_of = pd.Series(np.arange(len(loaded.index)), index=loaded.index["id"].to_numpy())
    evaluated = cell["slice_id"].drop_duplicates().tolist()  # one volume per batch, in order
    absent = [s for s in evaluated if s not in row_of.index]
    if absent:
        raise UserError(f"{', '.join(absent)}: not in the data set {loaded.location} (changed?)")
    rows = row_of.loc[evaluated].to_numpy()
    window = data_config.volume.patch or resolve(meta.model).roi
    inferer = SlidingWindow(net, window, overlap=data_config.volume.overlap)
    kwargs = dict(settings["kwargs"])
    kwargs["activation"] = activation = checkpoint_activation(
        meta.activation, kwargs.get("activation"), str(path)
    )
    kwargs["valid_range"] = loaded.valid_range
    stem = f"{file_stem(name)}__{file_stem(label)}__eps{eps:g}__{file_stem(loss)}"
    target = Path(out) if out is not None else run_dir / "export" / stem
    check_output_dir(target, "export folder")
    files: list[Path] = []
    frames, written = [], {}
    for scan in chosen:
        position = evaluated.index(scan)
        result = evaluate_sweep(
            inferer, loaded, rows, settings["attack"], {eps: [loss]}, model_name=name,
            arch=meta.model, attack_kwargs=kwargs, batch_size=1, only_batches=[position],
            keep_adversarial=True, through=through, nsd_mm=nsd_mm,
        )[0]  # fmt: skip
        frames.append(result.records)
        row = int(row_of[scan])
        x, y = loaded.volume(row)
        x_adv = torch.from_numpy(next(iter(result.adversarial.values()))[0])  # (1, D, H, W)
        with torch.no_grad():
            device_of = next(net.parameters()).device
            clean = class_prediction(inferer(x[None].to(device_of)), activation)[0].cpu()
            adv = class_prediction(inferer(x_adv[None].to(device_of)), activation)[0].cpu()
        std = float(loaded.index["std"].iloc[row])
        images = {"image": x[0].numpy(), "adversarial": x_adv[0].numpy(),
                  "perturbation_source": (x_adv[0] - x[0]).numpy() * std}  # fmt: skip
        masks = {"truth": (y > 0.5).numpy(), "clean": clean.numpy(), "adversarial": adv.numpy()}
        written[scan] = _write_volume(target, loaded.index.iloc[row], images, masks, files)
    check = _check(cell, pd.concat(frames, ignore_index=True), chosen)
    cell_info = {"model": name, "attack": label, "eps": eps, "loss": loss, "through": through}
    if trained_seed is not None:
        cell_info["train_seed"] = trained_seed
    document = {
        "cell": cell_info, "checkpoint": str(path.resolve()), "data": str(loaded.location),
        "attack": settings, "classes": list(loaded.classes), "window": list(window),
        "how": "recomputed with advseg.evaluate.evaluate_sweep on these volumes (the "
        "evaluation's batch numbers); 'check' compares each volume's voxel counts with the "
        "run's records", "volumes": written, "check": check.to_dict(orient="records"),
    }  # fmt: skip
    write_text_atomic(target / "export.json", json.dumps(document, indent=1) + "\n")
    files.append(target / "export.json")
    return ExportResult(target, cell_info, chosen, check, files)


def _write_volume(
    target: Path,
    row: pd.Series,
    images: dict[str, np.ndarray],
    masks: dict[str, np.ndarray],
    files: list[Path],
) -> dict[str, str]:
    """One volume's arrays (``(D, H, W)`` images, ``(K, D, H, W)`` masks on the model's grid)
    written as NIfTI on the source grid; returns kind -> file (relative to ``target``)."""
    import nibabel as nib

    from advseg.data.nifti import canonical_geometry
    from advseg.data.volume_prep import resample
    from advseg.runs.names import file_stem

    source = (int(row["source_depth"]), int(row["source_height"]), int(row["source_width"]))
    path = str(row["image_path"])
    nifti = path.endswith((".nii", ".nii.gz"))
    if nifti or Path(path).is_dir():
        affine = canonical_geometry(path)[1]
    else:  # a PNG stack: its spacing, (W, H, D) voxel order
        spacing = [row["source_spacing_w"], row["source_spacing_h"], row["source_spacing_d"]]
        affine = np.diag([*map(float, spacing), 1.0])
    back = None
    if nifti:  # the canonical grid back to the file's own orientation
        original = nib.orientations.io_orientation(nib.load(path).affine)
        canonical = nib.orientations.io_orientation(affine)
        back = nib.orientations.ornt_transform(canonical, original)
    empty = np.zeros((0, *images["image"].shape), np.uint8)
    out: dict[str, str] = {}
    arrays: dict[str, np.ndarray] = {}
    for kind, image in images.items():  # (D, H, W) -> source grid -> (W, H, D)
        arrays[kind] = resample(image.astype(np.float32), empty, source)[0].transpose(2, 1, 0)
    for kind, mask in masks.items():  # (K, D, H, W) -> (W, H, D, K)
        grid = resample(np.zeros(mask.shape[1:], np.float32), mask.astype(np.uint8), source)[1]
        arrays[f"{kind}_mask"] = grid.transpose(3, 2, 1, 0)
    for kind, array in arrays.items():
        image = nib.Nifti1Image(np.ascontiguousarray(array), affine)
        if back is not None:
            image = image.as_reoriented(back)
        relative = f"nifti/{file_stem(str(row['scan']))}_{kind}.nii.gz"
        write_bytes_atomic(target / relative, _nifti_bytes(np.asanyarray(image.dataobj),
                                                          image.affine))  # fmt: skip
        files.append(target / relative)
        out[kind] = relative
    return out
