"""``advseg data``: make the synthetic phantom, describe (and check) a data set."""

from __future__ import annotations

import warnings
from pathlib import Path

import typer
from rich.table import Table

from advseg.atomic import check_output_dir
from advseg.cli.console import console
from advseg.cli.flags import count_flag, seed_flag
from advseg.errors import AdvsegWarning, UserError

app = typer.Typer(
    help="Data sets: write the synthetic phantom, describe or check a data set.",
    no_args_is_help=True,
)


LABELS_HELP = (
    "NIfTI label mapping: a JSON file or 1=liver,2=tumour (default: the data set's "
    "dataset.json labels)."
)
STRICT_HELP = "Refuse NIfTI label values the mapping lacks (default: count them as background)."
RESIZE_HELP = (
    "Non-square slices: pad (keep the aspect ratio, pad to the square) or stretch (the paper's)."
)
DATA_HELP = (
    "Data directory (Kaggle layout or NIfTI), or 'synthetic' for the synthetic phantom "
    "(generated images); required."
)
CACHE_HELP = (
    "Cache of preprocessed slices, outside the data directory (default: $ADVSEG_CACHE, else "
    "$XDG_CACHE_HOME/advseg, else ~/.cache/advseg)."
)


def no_data(last: Path | None = None) -> UserError:
    """The refusal of a command given no ``--data``: what to pass, and for ``train --resume``
    (``last``: the run's last checkpoint) the data set that run trained on."""
    from advseg.catalogue import DATA_CHOICES

    if last is not None:
        from advseg.data.location import SYNTHETIC
        from advseg.models.checkpoint import checkpoint_exists, read_metadata

        if checkpoint_exists(last):
            config = read_metadata(last).data.get("config")
            if isinstance(config, dict):  # an empty path: trained before --data was required
                path = config.get("path") or SYNTHETIC
                return UserError(f"--data: not given; {last} trained on {path}: pass --data {path}")
    return UserError(f"no data set given: {DATA_CHOICES}")


def label_settings(labels: str | None, strict: bool) -> dict[str, object]:
    """The :class:`DataConfig` fields of ``--labels`` (a JSON file or ``1=liver,...``) and
    ``--strict-labels``."""
    from advseg.data.nifti import parse_label_map

    settings: dict[str, object] = {"strict_labels": strict}
    if labels and Path(labels).is_file():
        settings["nifti_labels_file"] = Path(labels)
    elif labels:
        settings["nifti_labels"] = dict(parse_label_map(labels))
    return settings


@app.command()
def synth(
    out: Path = typer.Option(..., "--out", help="Directory to create."),
    kind: str = typer.Option(
        "phantom",
        help="phantom: abdominal MRI (Kaggle layout); nifti: abdominal CT (Decathlon layout); "
        "mri: brain MRI volumes with a bias field and Rician noise (Decathlon layout).",
    ),
    cases: int = typer.Option(8, callback=count_flag(), help="Cases (patients)."),
    scans: int = typer.Option(
        2, callback=count_flag(), help="Scans (days) per case (phantom only)."
    ),
    slices: int = typer.Option(
        64, callback=count_flag(), help="Slices per scan (per volume for nifti and mri)."
    ),
    seed: int = typer.Option(
        0, callback=seed_flag, help="Random seed; the same seed writes the same files."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists."),
) -> None:
    """Write a synthetic data set: the MRI phantom, abdominal CT volumes (--kind nifti) or brain
    MRI volumes (--kind mri)."""
    from advseg.data.synth import write_synthetic

    check_output_dir(out, "--out directory")
    if cases < 2:  # a valid set (data info reads it), but nothing can be held out of it
        warnings.warn(
            f"--cases {cases}: a data set of one case has no case to hold out; train, evaluate "
            "and run split by case and need 2 or more",
            AdvsegWarning,
            stacklevel=1,
        )
    if kind == "nifti":
        from advseg.data.synth_nifti import write_synthetic_nifti

        made = write_synthetic_nifti(
            out, cases=cases, slices=slices, seed=seed, overwrite=overwrite
        )
        console().print(
            f"wrote {made.cases} CT volumes ({made.slices} slices, "
            f"{made.with_mask / made.slices:.1%} with a mask) to {made.path} "
            "(labels in dataset.json)"
        )
        return
    if kind == "mri":
        from advseg.data.synth_mri import write_synthetic_mri

        made = write_synthetic_mri(out, cases=cases, slices=slices, seed=seed, overwrite=overwrite)
        console().print(
            f"wrote {made.cases} brain MRI volumes ({made.slices} slices, "
            f"{made.with_mask / made.slices:.1%} with a mask) to {made.path} "
            "(labels in dataset.json)"
        )
        return
    if kind != "phantom":
        raise UserError(f"--kind: {kind!r} is not one of phantom, nifti, mri")
    summary = write_synthetic(
        out, cases=cases, scans=scans, slices=slices, seed=seed, overwrite=overwrite
    )
    console().print(
        f"wrote {summary.slices} slices ({summary.scans} scans, {summary.cases} cases, "
        f"{summary.with_mask / summary.slices:.1%} with a mask) to {summary.path}"
    )


def _exclude(text: str) -> str | list[str]:
    """``default`` / ``host`` / ``none``, or comma-separated scan ids."""
    if "_day" in text:
        return [s.strip() for s in text.split(",") if s.strip()]
    return text


@app.command()
def info(
    path: Path = typer.Argument(..., help="Data directory (train.csv + train/, or imagesTr/)."),
    exclude: str = typer.Option(
        "default", help="Scans to leave out: default, host, none, or case7_day0,case81_day30."
    ),
    labels: str | None = typer.Option(None, help=LABELS_HELP),
    strict_labels: bool = typer.Option(False, "--strict-labels", help=STRICT_HELP),
    check: bool = typer.Option(
        False,
        "--check",
        help="Decode every slice too (fills the cache, so later runs decode nothing).",
    ),
    size: int = typer.Option(224, help="Preprocessed size for --check."),
    resize: str = typer.Option("pad", "--resize", help=RESIZE_HELP),
    skip_unreadable: bool = typer.Option(
        False, "--skip-unreadable", help="Skip and count unreadable slices instead of stopping."
    ),
    cache_dir: Path | None = typer.Option(None, "--cache-dir", help=CACHE_HELP),
) -> None:
    """Describe a data set: slices, scans, cases, classes, masks, sizes, exclusions."""
    from advseg.data.index import summarize_index
    from advseg.data.load import DataConfig, build_index, load_data
    from advseg.data.preprocess import PreprocessConfig

    config = DataConfig(
        path=path,
        cache_dir=cache_dir,
        exclude=_exclude(exclude),
        skip_unreadable=skip_unreadable,
        **label_settings(labels, strict_labels),
        preprocess=PreprocessConfig(size=size, resize=resize),
    )
    if check:
        data = load_data(config)
        index, exclusions = data.index, data.exclusions
    else:
        index, exclusions = build_index(config)
    summary = summarize_index(index, exclusions)
    table = Table(title=str(path), show_header=False)
    table.add_column("field", no_wrap=True)
    table.add_column("value", overflow="fold")
    table.add_row("slices", str(summary.slices))
    table.add_row("scans", str(summary.scans))
    table.add_row("cases", str(summary.cases))
    table.add_row("classes", ", ".join(summary.classes))
    table.add_row("with a mask", f"{summary.with_mask:.1%}")
    for name, frac in summary.class_fraction.items():
        table.add_row(f"  {name}", f"{frac:.1%}")
    table.add_row("sizes (WxH)", ", ".join(f"{k}: {v}" for k, v in summary.sizes.items()))
    lines = summary.exclusions.lines() or ["none"]
    table.add_row("left out", "\n".join(lines))
    if check:
        table.add_row("cache", f"{data.cache_path} ({data.decoded} slices decoded now)")
    console().print(table)
