"""Rebuild ``catalogue.json`` from the live registries: ``python -m advseg.cli.catalogue``.

Run it (``make catalogue``) after adding or changing a model, attack, loss or defence;
``tests/test_catalogue.py`` asserts that the committed file equals :func:`collect`. The listing
itself (:mod:`advseg.catalogue`) only reads the file, so the torch-free commands stay torch-free
and the low layers that read names from it import nothing above them.
"""

from __future__ import annotations

from advseg.catalogue import (
    CLASSES,
    IN_CHANNELS,
    PATH,
    AttackRow,
    Catalogue,
    CorruptionRow,
    DefenceRow,
    ModelRow,
    write,
)


def collect() -> Catalogue:
    """The catalogue from the live registries (imports torch and builds every zoo model on the
    meta device)."""
    from advseg.attacks import ATTACKS, attack_options
    from advseg.corruptions import CORRUPTIONS
    from advseg.defences import DEFENCES
    from advseg.losses import LOSSES
    from advseg.models import list_models

    defences = []
    for name in DEFENCES.names():
        cls = DEFENCES.get(name)
        defences.append(DefenceRow(name, cls.parameter, cls.default, DEFENCES.help(name)))
    return Catalogue(
        models=tuple(
            ModelRow(m.name, m.arch, m.encoder, m.params, m.description)
            for m in list_models(IN_CHANNELS, CLASSES)
        ),
        attacks=tuple(
            AttackRow(name, ATTACKS.help(name), tuple(attack_options(name)))
            for name in ATTACKS.names()
        ),
        losses=tuple((name, LOSSES.help(name)) for name in LOSSES.names()),
        defences=tuple(defences),
        corruptions=tuple(_corruption_row(name) for name in CORRUPTIONS.names()),
    )


def _corruption_row(name: str) -> CorruptionRow:
    from advseg.corruptions import CORRUPTIONS, create_corruption

    corruption = create_corruption(name)
    levels = tuple((float(low), float(high)) for low, high in corruption.levels)
    return CorruptionRow(name, CORRUPTIONS.help(name), corruption.strength, levels)


if __name__ == "__main__":  # python -m advseg.cli.catalogue: rewrite catalogue.json
    write(collect())
    print(f"wrote {PATH}")
