"""``advseg models``: the model zoo with parameter counts."""

from __future__ import annotations

import typer
from rich.table import Table

from advseg import catalogue
from advseg.cli.console import console


def models(
    in_channels: int = typer.Option(
        catalogue.IN_CHANNELS, "--in-channels", help="Input channels C."
    ),
    classes: int = typer.Option(catalogue.CLASSES, "--classes", help="Output classes K."),
) -> None:
    """List the models by name with their parameter counts (smp:<Arch>:<encoder> also works).

    At the default sizes the list is read from the catalogue (no torch); other sizes build each
    model on the meta device to count its parameters.
    """
    if (in_channels, classes) == catalogue.load().sizes:
        rows = catalogue.load().models
    else:
        from advseg.models import list_models

        rows = list_models(in_channels, classes)
    table = Table(title=f"advseg models ({in_channels} channels in, {classes} classes)")
    for column in ("name", "architecture", "encoder", "params"):
        table.add_column(column, justify="right" if column == "params" else "left")
    table.add_column("about")
    for info in rows:
        params = f"{info.params / 1e6:.2f}M"
        table.add_row(info.name, info.arch, info.encoder or "-", params, info.description)
    out = console()
    out.print(table)
    out.print("Any segmentation_models_pytorch model: smp:<Arch>:<encoder>, e.g. smp:FPN:resnet34")
