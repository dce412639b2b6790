"""``advseg evaluate`` (a robustness sweep, Table II) and ``advseg attacks`` (what can be used)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from advseg import catalogue
from advseg.catalogue import DEFAULT_PROTOCOL
from advseg.cli.console import console
from advseg.cli.data import CACHE_HELP
from advseg.cli.flags import count_flag, eps_flag, options_named
from advseg.errors import UserError
from advseg.threads import THREADS_HELP


def evaluate_command(
    checkpoints: list[Path] | None = typer.Argument(
        None, help="Checkpoints (PATH or PATH.safetensors); none with a model below."
    ),
    out: Path = typer.Option(..., "--out", help="Run directory (records/, summary.csv)."),
    data: str | None = typer.Option(
        None,
        "--data",
        help="Data directory, or 'synthetic' (the phantom; default: the one each checkpoint was "
        "trained on).",
    ),
    cache_dir: Path | None = typer.Option(None, "--cache-dir", help=CACHE_HELP),
    split: str = typer.Option("test", "--split", help="'test' (held-out cases) or 'all'."),
    attack: list[str] | None = typer.Option(
        None,
        "--attack",
        help="Attack name (repeatable; default: fgsm, or none when --corruption is given).",
    ),
    corruption: list[str] = typer.Option(
        [],
        "--corruption",
        help="Corruption cells (repeatable): NAME:SEVERITY (motion:3), NAME (severities 1-5) or "
        "all; `advseg corruptions` lists them (default: none).",
    ),
    corruption_seed: int = typer.Option(
        0, "--corruption-seed", help="Seed of the corruptions' draws (default 0)."
    ),
    loss: list[str] | None = typer.Option(
        None,
        "--loss",
        help="Attack loss (repeatable). Default: bce, focal, dicefocal for a sigmoid checkpoint; "
        "ce, dicece for a softmax one.",
    ),
    eps: list[float] = typer.Option(
        [0.009], "--eps", help="Budget (repeatable).", callback=eps_flag
    ),
    steps: int | None = typer.Option(
        None, "--steps", help="Iterations of iterative attacks (default: each attack's own)."
    ),
    alpha: float | None = typer.Option(
        None, "--alpha", help="Step size of iterative attacks (default: each attack's own)."
    ),
    norm: str | None = typer.Option(None, "--norm", help="linf (default) or l2."),
    restarts: int | None = typer.Option(
        None, "--restarts", help="PGD-family restarts (default 1)."
    ),
    update: str | None = typer.Option(
        None, "--update", help="FGSM update: sign (eq. 5; default) or notebook (the paper's blend)."
    ),
    protocol: str = typer.Option(
        DEFAULT_PROTOCOL, "--protocol", help="Dice protocol: paper, per-class or global."
    ),
    batch_size: int = typer.Option(
        16, "--batch-size", callback=count_flag(), help="Slices per batch."
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N."),
    threads: int | None = typer.Option(None, "--threads", help=THREADS_HELP),
    max_slices: int | None = typer.Option(
        None,
        "--max-slices",
        help="Evaluate at most N slices per checkpoint (seeded by its split seed, spread over "
        "cases; default: all).",
    ),
    examples: int = typer.Option(
        0, "--examples", callback=count_flag(0), help="Slices per cell saved for figures."
    ),
    through: list[str] = typer.Option(
        ["inference"],
        "--through",
        help="3D models: the threat protocol (repeatable): inference (end to end through the "
        "sliding window that scores the volume; default) or tiles (non-overlapping tiles "
        "attacked one by one, as the published volumetric studies).",
    ),
    nsd_tolerance: float = typer.Option(
        1.0,
        "--nsd-tolerance",
        help="3D models: the normalised surface Dice's tolerance in mm (default 1).",
    ),
    erase: list[str] = typer.Option(
        [],
        "--erase",
        help="Targeted: make this class vanish (repeatable), e.g. stomach (default: none, "
        "untargeted).",
    ),
    compat: str = typer.Option(
        "none",
        "--compat",
        help="none, or notebook: reproduce the paper's notebook code (blended FGSM, swapped "
        "loss arguments, soft masks); not a recommended attack.",
    ),
    defence: list[str] = typer.Option(
        ["none"],
        "--defence",
        help="Input defence in front of each checkpoint (repeatable): none, median:3, blur:1, "
        "bitdepth:4, jpeg:75, noise:0.1. Attack it adaptively with e.g. --attack pgd+bpda.",
    ),
    eot_samples: int | None = typer.Option(
        None, "--eot-samples", help="Draws averaged by +eot attacks (default 8)."
    ),
    trace: bool = typer.Option(
        False, "--trace", help="Keep iterative attacks' loss and Dice per step (traces/)."
    ),
    activation: str | None = typer.Option(
        None,
        "--activation",
        help="sigmoid or softmax: how logits become probabilities. Default: what each "
        "checkpoint was trained with (sigmoid where it says nothing); another is refused.",
    ),
    attack_option: list[str] = typer.Option(
        [],
        "--attack-option",
        help="Any attack option as KEY=VALUE (repeatable; VALUE read as YAML), e.g. "
        "random_start=false; `advseg attacks` lists each attack's options (default: none).",
    ),
    nnunet: Path | None = typer.Option(
        None,
        "--nnunet",
        help="An nnU-Net v2 results folder (DatasetXXX_Name/ or TRAINER__PLANS__CONFIG/) to "
        "attack through its own inference; --data names its raw data set; eps in the source's "
        "units (HU for CT) (default: none).",
    ),
    configuration: list[str] = typer.Option(
        [],
        "--configuration",
        help="nnU-Net configuration: 2d, 3d_fullres, 3d_lowres (default: 3d_fullres); repeat it "
        "to judge several configurations of the folder on the same raw volumes, e.g. "
        "--configuration 2d --configuration 3d_fullres (each times each --folds group).",
    ),
    folds: list[str] = typer.Option(
        [],
        "--folds",
        help="nnU-Net folds averaged, e.g. 0,1 (default: every fold found); repeat it to judge "
        "several models of the folder, e.g. --folds 0 --folds 1 --folds 0,1.",
    ),
    transfer: bool = typer.Option(
        False,
        "--transfer",
        help="Also score each external model's adversarial images on the run's other external "
        "models (--folds groups, --configuration values): transfer cells (default: off).",
    ),
    nnunet_checkpoint: str = typer.Option(
        "checkpoint_final.pth", "--nnunet-checkpoint", help="nnU-Net checkpoint file name."
    ),
    mirroring: bool = typer.Option(
        True, "--mirroring/--no-mirroring", help="nnU-Net test-time mirroring."
    ),
    bundle: Path | None = typer.Option(
        None,
        "--bundle",
        help="A MONAI bundle folder (configs/inference.json, models/model.pt) to attack through "
        "its own preprocessing and inferer; --data names a Decathlon-style folder; eps in the "
        "source's units (default: none).",
    ),
    torchscript: Path | None = typer.Option(
        None, "--torchscript", help="A TorchScript model file (torch.jit.save) (default: none)."
    ),
    model_factory: str | None = typer.Option(
        None,
        "--model-factory",
        help="package.module:function returning an nn.Module (default: none); with --weights.",
    ),
    weights: Path | None = typer.Option(
        None, "--weights", help="safetensors weights of the --model-factory module (default: none)."
    ),
    classes: str | None = typer.Option(
        None,
        "--classes",
        help="The outputs' classes of a --torchscript / --model-factory model, comma-separated, "
        "as the data names them (default: none; required with those; for a --bundle: its "
        "metadata.json's channel_def).",
    ),
    in_channels: int = typer.Option(
        1, "--in-channels", help="Input channels of a --torchscript / --model-factory model."
    ),
    size: int = typer.Option(
        224, "--size", help="Side its slices are resized to (--torchscript / --model-factory)."
    ),
) -> None:
    """Attack checkpoints on a data split; write records and print the paper's Table II.

    Run it under torchrun (`torchrun --nproc-per-node N -m advseg evaluate ...`) to shard the
    slices over several processes or GPUs.
    """
    attack = list(attack) if attack else ([] if corruption else ["fgsm"])
    catalogue.check_names("attack", attack, "--attack")  # a typo answered before torch loads
    catalogue.check_names("corruption", corruption, "--corruption")
    catalogue.check_names("loss", loss or [], "--loss")
    catalogue.check_names("defence", defence, "--defence")
    from advseg import distributed
    from advseg.cli.table_ii import table_ii
    from advseg.data.location import data_argument
    from advseg.evaluate import EvaluateConfig, evaluate
    from advseg.stats.summary import UNITS
    from advseg.threads import set_threads

    set_threads(threads)  # before any model or data: torch's pool is sized once
    options = {"steps": steps, "alpha": alpha, "norm": norm, "restarts": restarts}
    options["update"] = update
    options["eot_samples"] = eot_samples
    options["activation"] = activation
    options = {k: v for k, v in options.items() if v is not None}
    for key, value in parse_options(attack_option).items():
        if key in options:
            raise UserError(
                f"--attack-option {key}: given twice (also as --{key.replace('_', '-')})"
            )
        options[key] = value
    external, *more_external = _external(
        nnunet, configuration, folds, nnunet_checkpoint, mirroring, torchscript, model_factory,
        weights, classes, in_channels, activation, size, bundle,
    )  # fmt: skip
    config = EvaluateConfig(
        checkpoints=list(checkpoints or []),
        out=out,
        data=data_argument(data),
        cache_dir=cache_dir,
        split=split,
        attacks=list(attack),
        losses=list(loss) or None if loss else None,
        eps=list(eps),
        attack_options=options,
        protocol=protocol,
        batch_size=batch_size,
        device=device,
        examples=examples,
        erase=list(erase),
        compat=compat,
        defences=list(defence),
        trace=trace,
        max_slices=max_slices,
        corruptions=list(corruption),
        corruption_seed=corruption_seed,
        external=external,
        more_external=more_external,
        transfer=transfer,
        through=list(through),
        nsd_mm=nsd_tolerance,
    )
    with options_named(
        ("protocol", "split", "device", "max_slices")
    ):  # as typed, not the library's keys
        result = evaluate(config, progress=True)
    if not distributed.is_main():
        return
    terminal = console()
    for table in table_ii(result.cells, config.protocol, result.locations):
        terminal.print(table)
    kept, left = UNITS[config.protocol]
    for row in result.table.itertuples(index=False):
        terminal.print(
            f"{row.model}: clean DSC ({config.protocol} Dice) over {row.units} {kept} "
            f"({row.excluded} {left}); intervals: {row.interval}"
        )
    slices = ", ".join(f"{k}: {v}" for k, v in result.slices.items())
    terminal.print(f"slices evaluated ({config.split} split): {slices}")
    terminal.print(f"records: {len(result.record_files)} files in {out / 'records'}")
    terminal.print(f"summary: {result.summary_path}")


def parse_options(pairs: list[str]) -> dict[str, object]:
    """``["steps=10", "random_start=false"]`` -> ``{"steps": 10, "random_start": False}``.

    Raises:
        UserError: a pair without ``=``, or a key given twice: one line naming it.
    """
    import yaml

    options: dict[str, object] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise UserError(f"--attack-option {pair!r}: expected KEY=VALUE, e.g. steps=10")
        if key in options:
            raise UserError(f"--attack-option {key}: given twice")
        try:
            options[key] = yaml.safe_load(text) if text.strip() else text
        except yaml.YAMLError:
            options[key] = text
    return options


def attacks_command() -> None:
    """List the attacks (with their options), the losses they can use and the input defences.

    Options go to ``advseg evaluate`` as ``--attack-option KEY=VALUE``; e.g. ``sea`` runs its
    authors' budget (``preset=reference``: 4 members x 300 APGD steps) unless given
    ``preset=fast`` (25 each), and takes ``members=[masked-bce, padam-bce, ...]``.
    """
    listed = catalogue.load()
    table = Table(
        title="attacks (--attack-option KEY=VALUE; sea: preset=reference (default) or fast)"
    )
    table.add_column("name")
    table.add_column("what")
    table.add_column("options")
    for attack in listed.attacks:
        table.add_row(attack.name, attack.help, ", ".join(attack.options))
    losses = Table(title="losses (--loss)")
    losses.add_column("name")
    losses.add_column("what")
    for name, text in listed.losses:
        losses.add_row(name, text)
    defences = Table(title="input defences (--defence NAME:VALUE; attack them with +bpda, +eot)")
    for column in ("name", "value", "what"):
        defences.add_column(column)
    for defence in listed.defences:
        value = f"{defence.parameter} (default {defence.default:g})"
        defences.add_row(defence.name, value, defence.help)
    out = console()
    out.print(table)
    out.print(losses)
    out.print(defences)


def corruptions_command() -> None:
    """List the corruptions: each one's strength parameter and its range at severities 1 to 5."""
    listed = catalogue.load()
    table = Table(title="corruptions (--corruption NAME:SEVERITY, NAME for 1-5, or all)")
    table.add_column("name", no_wrap=True)
    for column in ("what", "strength", *(f"severity {s}" for s in range(1, 6))):
        table.add_column(column)
    for row in listed.corruptions:
        levels = [f"{low:g}-{high:g}" for low, high in row.levels]
        table.add_row(row.name, row.help, row.strength, *levels)
    console().print(table)


def _external(
    nnunet: Path | None,
    configuration: list[str],
    folds: list[str],
    checkpoint: str,
    mirroring: bool,
    torchscript: Path | None,
    factory: str | None,
    weights: Path | None,
    classes: str | None,
    in_channels: int,
    activation: str | None,
    size: int,
    bundle: Path | None = None,
):
    """The models advseg did not train, from the options: ``[None]`` without one; for an
    nnU-Net folder one per ``--configuration`` (default ``3d_fullres``) and ``--folds`` group,
    configuration first (``2d`` f0, ``2d`` f1, ``3d_fullres`` f0, ...)."""
    given = [(f, v) for f, v in (("--nnunet", nnunet), ("--bundle", bundle),
                                 ("--torchscript", torchscript), ("--model-factory", factory))
             if v is not None]  # fmt: skip
    if len(given) > 1:
        raise UserError(f"{given[0][0]} and {given[1][0]}: one external model at a time")
    if weights is not None and factory is None:
        raise UserError("--weights: goes with --model-factory")
    if not given:
        if folds:
            raise UserError("--folds: goes with --nnunet")
        if configuration:
            raise UserError("--configuration: goes with --nnunet")
        return [None]
    from advseg.models.external import ExternalConfig

    flag, value = given[0]
    kind = {"--nnunet": "nnunet", "--bundle": "bundle", "--torchscript": "torchscript"}.get(
        flag, "factory"
    )
    names = [c.strip() for c in (classes or "").split(",") if c.strip()]
    if kind == "nnunet" and (names or activation):
        raise UserError("--nnunet: the classes and activation come from its dataset.json")
    if kind == "bundle" and activation:
        raise UserError("--bundle: the activation comes from its postprocessing")
    for given_flag, values in (("--folds", folds), ("--configuration", configuration)):
        if values and kind != "nnunet":
            raise UserError(f"{given_flag}: goes with --nnunet")
    groups = [[f.strip() for f in group.split(",") if f.strip()] for group in folds] or [[]]
    if len({tuple(g) for g in groups}) != len(groups):
        raise UserError(f"--folds: each group once, got {' '.join(folds)}")
    configurations = [c.strip() for c in configuration] or ["3d_fullres"]
    if len(set(configurations)) != len(configurations):
        raise UserError(f"--configuration: each once, got {' '.join(configurations)}")
    return [
        ExternalConfig(
            kind=kind,
            path=str(value),
            weights=str(weights) if weights else None,
            configuration=one,
            folds=group,
            checkpoint=checkpoint,
            mirroring=mirroring,
            classes=names,
            in_channels=in_channels,
            activation=activation or "sigmoid",
            size=size,
        )
        for one in configurations
        for group in groups
    ]
