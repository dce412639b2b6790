"""``advseg export`` of a model advseg did not train (an nnU-Net folder or a MONAI bundle): the
chosen volumes, recomputed, as NIfTI files on each source volume's own grid, in its units.

The model and its data are opened again from the run's ``evaluate.yaml`` (its ``external``
entry and ``data``, :func:`~advseg.evaluate.external.open_external`); the cell's attack runs on
the batches (one volume each) that held the chosen volumes, numbered as in the evaluation, so
random starts are drawn as they were (:func:`advseg.evaluate.engine.draw_seed`). The adversarial
image is the attack's output itself: the perturbation was made in the source's units on the
source grid, so nothing is resampled or rescaled on the way out, and a user can feed it to the
model's own tool (``CASE_0000.nii.gz``, nnU-Net's naming).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from advseg.errors import UserError


def external_models(run_dir: Path) -> dict[str, dict]:
    """``external.json`` of an ``advseg evaluate`` output: model name -> provenance."""
    import json

    path = run_dir / "external.json"
    if not path.is_file():
        return {}
    return json.loads(path.read_text())


def export_volumes(
    run_dir: Path,
    cell: pd.DataFrame,
    chosen: list[str],
    settings: dict[str, Any],
    put: Any,
    *,
    data: Path | None = None,
    device: str | torch.device = "cpu",
) -> tuple[pd.DataFrame, dict[str, dict[str, str]], dict[str, Any]]:
    """Recompute the cell on ``chosen`` volumes and write them with ``put(relative, bytes)``.

    Returns:
        the recomputed records (for the check against the run's), per volume the files written
        (``image_CCCC``, ``adversarial_CCCC``: every channel, float32, the source's units;
        ``truth_<class>``, ``clean_<class>``, ``adversarial_<class>``: uint8 masks), and what
        the model was (its provenance in the run's ``external.json``).

    Raises:
        UserError: the run keeps no ``external`` settings, or the data no longer hold a volume.
    """
    from advseg.config import from_dict, load_yaml
    from advseg.evaluate.cells import evaluate_cell
    from advseg.evaluate.external import open_external
    from advseg.labels import class_prediction
    from advseg.models.external import ExternalConfig
    from advseg.runs.names import file_stem

    name = str(cell["model"].iloc[0])
    settings_file = run_dir / "evaluate.yaml"  # advseg.evaluate.command.SETTINGS_FILE
    grid_file = run_dir / "config.yaml"  # an experiment grid's: models[i].external and .data
    if not settings_file.is_file() and grid_file.is_file():
        saved = load_yaml(grid_file) or {}
        entry = next((m for m in saved.get("models") or [] if isinstance(m, dict)
                      and m.get("name") == name and m.get("external")), None)  # fmt: skip
        if entry is None:
            raise UserError(f"{grid_file}: names no external model {name!r}")
        config = from_dict(ExternalConfig, entry["external"], where=f"{grid_file} {name}")
        saved = {"data": entry.get("data")}
    else:
        saved = (load_yaml(settings_file) or {}) if settings_file.is_file() else {}
        if not saved.get("external"):
            raise UserError(f"{run_dir}: no evaluate.yaml with the external model's settings")
        listed = [saved["external"], *(saved.get("more_external") or [])]
        configs = [from_dict(ExternalConfig, c, where=f"{settings_file} external") for c in listed]
        config = next((c for c in configs if c.label == name), None)
        if config is None:
            raise UserError(f"{settings_file}: names no external model {name!r}")
    if config.kind not in ("nnunet", "bundle"):
        raise UserError(f"--model {name}: export writes the volumes of --nnunet and --bundle "
                        f"models; a --{config.flag} model's slices are not exported")  # fmt: skip
    where = data if data is not None else saved.get("data")
    judged = open_external(config, where, device=device)
    judged.name = name  # a grid's entry names it
    cases = judged.data
    row_of = pd.Series(np.arange(len(cases.index)), index=cases.index["id"].astype(str).to_numpy())
    evaluated = cell["slice_id"].astype(str).drop_duplicates().tolist()
    absent = [s for s in evaluated if s not in row_of.index]
    if absent:
        raise UserError(f"{', '.join(absent)}: not in the data {cases.location} (changed?)")
    rows = row_of.loc[evaluated].to_numpy()
    positions = sorted(evaluated.index(s) for s in chosen)
    kwargs = dict(settings["kwargs"])
    kwargs["activation"] = judged.activation
    kwargs["valid_range"] = judged.valid_range
    loss = str(cell["loss"].iloc[0])
    result = evaluate_cell(
        judged.model, cases, rows, settings["attack"], [loss], float(cell["eps"].iloc[0]),
        model_name=judged.name, arch=judged.arch, attack_kwargs=kwargs, batch_size=1,
        keep_adversarial=True, only_batches=positions, erase=settings["erase"],
    )  # fmt: skip
    adversarial = result.adversarial[loss]  # (N, C, *S), in the order of positions
    files: dict[str, dict[str, str]] = {}
    for n, position in enumerate(positions):
        slice_id, row = evaluated[position], int(rows[position])
        image, mask = cases.read(row)
        x_adv = torch.from_numpy(adversarial[n])
        cases.prepare([row])
        with torch.no_grad():
            logits = [judged.model(v[None].to(device)).float().cpu() for v in (image, x_adv)]
        masks = {
            "truth": mask.numpy() > 0.5,
            "clean": class_prediction(logits[0], judged.activation)[0].numpy(),
            "adversarial": class_prediction(logits[1], judged.activation)[0].numpy(),
        }
        stem, entry = file_stem(slice_id), {}
        for kind, volume in (("image", image.numpy()), ("adversarial", x_adv.numpy())):
            for c, channel in enumerate(volume):
                name = f"nifti/{stem}_{kind}_{c:04d}.nii.gz"
                entry[f"{kind}_{c:04d}"] = put(name, cases.nifti(row, channel.astype(np.float32)))
        for kind, volume in masks.items():
            for k, cls in enumerate(judged.data.classes):
                name = f"nifti/{stem}_{kind}_{file_stem(cls)}.nii.gz"
                entry[f"{kind}_{cls}"] = put(name, cases.nifti(row, volume[k].astype(np.uint8)))
        files[slice_id] = entry
    return result.records, files, external_models(run_dir).get(judged.name, {})
