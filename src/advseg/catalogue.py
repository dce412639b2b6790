"""The names a user types, listed without importing torch: ``advseg models``, ``advseg attacks``
and ``advseg corruptions``.

The models, attacks, losses and input defences live in registries (:mod:`advseg.registry`) that
are filled when the modules defining them are imported: torch, MONAI and
segmentation_models_pytorch, several seconds. ``catalogue.json`` beside this module is a copy of
what the two listings show (names, one-line help, attack options, defence parameters and the
models' parameter counts at 3 channels in and 3 classes), made from the live registries by
:func:`advseg.cli.catalogue.collect` and written by ``python -m advseg.cli.catalogue`` (``make
catalogue``): this module reads it and imports no registry, so nothing here loads torch and
nothing imports back into it. ``tests/test_catalogue.py`` asserts
that it equals them exactly, so it cannot drift; after adding or changing a model, attack, loss
or defence, run that command. The listings read it, and :func:`check_names` refuses a mistyped
name on the command line with it in a fraction of a second; every name used for work is checked
again and built by its registry.

The Dice protocols (:mod:`advseg.stats.summary` computes them) are named here too, so that command
options can show their default without importing pandas, and so are the shipped experiment files
(:func:`find_experiment`) and the sentence naming the data choices (:data:`NO_DATA`): a mistyped
experiment name or a missing ``--data`` is answered before torch loads.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Literal

from advseg.errors import UserError

PROTOCOLS: tuple[str, ...] = ("paper", "per-class", "global")
DEFAULT_PROTOCOL = "per-class"
"""The Dice protocol of every command unless told otherwise (evaluate, run, report, certify)."""

#: The choices a command given no data set names.
DATA_CHOICES = (
    "pass --data PATH (a data directory: Kaggle layout or NIfTI) or --data synthetic (the "
    "synthetic phantom, generated images)"
)
NO_DATA = f"no data set given: {DATA_CHOICES}; in a YAML file, set data.path"

PATH = Path(__file__).with_name("catalogue.json")
IN_CHANNELS, CLASSES = 3, 3
"""The sizes the parameter counts of :attr:`Catalogue.models` are for (``advseg models``'
defaults; other sizes are counted on models built on the meta device)."""
SMP_NAMES = "smp:<Arch>:<encoder>"
"""The open-ended model names (:func:`advseg.models.zoo.resolve` checks them)."""
ADAPTIVE_MODES = ("bpda", "eot")
"""The suffixes of an adaptive attack name (``pgd+bpda+eot``, :mod:`advseg.attacks.adaptive`)."""


@dataclass(frozen=True)
class ModelRow:
    """One row of ``advseg models`` (the fields of :class:`advseg.models.ModelInfo`)."""

    name: str
    arch: str
    encoder: str | None
    params: int
    description: str


@dataclass(frozen=True)
class AttackRow:
    """An attack: its help line and the keyword options it accepts."""

    name: str
    help: str
    options: tuple[str, ...]


@dataclass(frozen=True)
class DefenceRow:
    """An input defence: the name and default of its ``NAME:VALUE`` parameter, its help line."""

    name: str
    parameter: str
    default: float
    help: str


@dataclass(frozen=True)
class CorruptionRow:
    """A corruption: its help line, its strength parameter and that parameter's five ranges."""

    name: str
    help: str
    strength: str
    levels: tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class Catalogue:
    """What the listings show, each part sorted by name as its registry lists it."""

    models: tuple[ModelRow, ...] = ()
    attacks: tuple[AttackRow, ...] = ()
    losses: tuple[tuple[str, str], ...] = ()  # (name, help)
    defences: tuple[DefenceRow, ...] = ()
    corruptions: tuple[CorruptionRow, ...] = ()
    sizes: tuple[int, int] = (IN_CHANNELS, CLASSES)


@cache
def load() -> Catalogue:
    """The catalogue as written in ``catalogue.json`` (no torch)."""
    raw = json.loads(PATH.read_text())
    return Catalogue(
        models=tuple(ModelRow(**row) for row in raw["models"]),
        attacks=tuple(
            AttackRow(**{**row, "options": tuple(row["options"])}) for row in raw["attacks"]
        ),
        losses=tuple((row["name"], row["help"]) for row in raw["losses"]),
        defences=tuple(DefenceRow(**row) for row in raw["defences"]),
        corruptions=tuple(
            CorruptionRow(**{**row, "levels": tuple(tuple(level) for level in row["levels"])})
            for row in raw.get("corruptions", [])
        ),
        sizes=tuple(raw["sizes"]),
    )


def check_names(
    kind: Literal["model", "attack", "loss", "defence", "corruption"],
    names: Iterable[str | None],
    flag: str,
) -> None:
    """Refuse a mistyped name before torch is imported: ``FLAG: unknown KIND ...``, worded as its
    registry words it (:func:`advseg.registry.unknown_message`). None (and the defence ``none``)
    is skipped; ``smp:`` model names and a defence's value (``median:3``) are left to the
    library, which checks every name again. A corruption is ``NAME``, ``NAME:SEVERITY`` or
    ``all`` (its severity is the library's to check).

    Raises:
        UserError: a name the catalogue (and so the registry) lacks.
    """
    from advseg.errors import UserError
    from advseg.registry import unknown_message

    listed = load()
    valid = {
        "model": [m.name for m in listed.models],
        "attack": [a.name for a in listed.attacks],
        "loss": [name for name, _ in listed.losses],
        "defence": [d.name for d in listed.defences],
        "corruption": [c.name for c in listed.corruptions],
    }[kind]
    for name in names:
        if name is None or (kind == "model" and name.startswith("smp:")):
            continue
        if kind == "attack":
            try:
                parse_attack_name(name)  # its suffixes, worded as the library words them
            except UserError as err:
                raise UserError(f"{flag}: {err}") from None
        base = {"attack": name.split("+")[0], "defence": name.strip().partition(":")[0],
                "corruption": name.strip().partition(":")[0]}.get(kind, name)  # fmt: skip
        if base not in valid and not (kind == "defence" and base in ("", "none")):
            if kind == "corruption" and base == "all":
                continue
            extra = {"model": f", or {SMP_NAMES}", "corruption": ", or all"}.get(kind, "")
            raise UserError(f"{flag}: {unknown_message(kind, base, valid)}{extra}")


def parse_attack_name(name: str) -> tuple[str, tuple[str, ...]]:
    """``pgd+bpda+eot`` -> ``("pgd", ("bpda", "eot"))``; an unknown or repeated suffix is a
    UserError (the base name is the registry's to check)."""
    base, *modes = str(name).split("+")
    for mode in modes:
        if mode not in ADAPTIVE_MODES:
            raise UserError(
                f"attack {name!r}: unknown adaptive suffix {mode!r}; valid: "
                + ", ".join(f"+{m}" for m in ADAPTIVE_MODES)
            )
    if len(set(modes)) != len(modes):
        raise UserError(f"attack {name!r}: a suffix is repeated")
    return base, tuple(modes)


def write(catalogue: Catalogue, path: Path = PATH) -> None:
    """Write ``catalogue`` as indented JSON (atomically), so that a change reads as a small diff."""
    from advseg.atomic import write_text_atomic

    raw = asdict(catalogue)
    raw["losses"] = [{"name": name, "help": text} for name, text in catalogue.losses]
    write_text_atomic(path, json.dumps(raw, indent=1, ensure_ascii=False) + "\n")


def packaged_config(name: str) -> Path | None:
    """The experiment file shipped with advseg under ``name`` (``demo``, ``paper.yaml``), if any."""
    stem = name.removesuffix(".yaml")
    path = Path(str(resources.files("advseg") / "configs" / f"{stem}.yaml"))
    return path if path.is_file() else None


def find_experiment(path_or_name: str | Path) -> Path:
    """An experiment file: ``path_or_name`` when it exists, else a shipped one of that name.

    Raises:
        UserError: neither exists (the shipped names are listed).
    """
    path = Path(path_or_name)
    if path.is_file():
        return path
    shipped = packaged_config(path.name) if path.parent == Path(".") else None
    if shipped is not None:
        return shipped
    names = sorted(p.stem for p in resources.files("advseg").joinpath("configs").iterdir())
    raise UserError(f"{path}: no such experiment file (shipped experiments: {', '.join(names)})")
