"""Adversarial attacks by name, with any loss: ``create_attack(name, model, loss=..., eps=...)``.

Each attack lives in its own module on the one base class :class:`~advseg.attacks.base.Attack`;
the modules are imported here so that :data:`ATTACKS` lists them all. A name may carry the
adaptive suffixes ``+bpda`` and ``+eot`` (:mod:`advseg.attacks.adaptive`) for models behind an
input defence, e.g. ``pgd+bpda``.
"""

from __future__ import annotations

import inspect

from torch import nn

from advseg.attacks.adaptive import DEFAULT_EOT_SAMPLES, adaptive_model
from advseg.attacks.apgd import APGD
from advseg.attacks.asma import ASMA
from advseg.attacks.base import ATTACKS, Attack, check_eps, frozen, model_logits
from advseg.attacks.bim import BIM
from advseg.attacks.cospgd import CosPGD
from advseg.attacks.dag import DAG
from advseg.attacks.fgsm import FGSM
from advseg.attacks.mifgsm import MIFGSM
from advseg.attacks.padam import PAdam
from advseg.attacks.pgd import PGD
from advseg.attacks.sea import SEA
from advseg.attacks.segpgd import SegPGD
from advseg.attacks.universal import Universal
from advseg.catalogue import parse_attack_name
from advseg.errors import UserError
from advseg.losses import PerSampleLoss

__all__ = ["APGD", "ASMA", "ATTACKS", "BIM", "DAG", "FGSM", "MIFGSM", "PGD", "SEA", "Attack",
           "CosPGD", "PAdam", "SegPGD", "Universal", "attack_options", "check_eps", "create_attack",
           "frozen", "model_logits", "parse_attack_name"]  # fmt: skip


def create_attack(
    name: str, model: nn.Module, loss: str | PerSampleLoss = "bce", eps: float = 0.009, **kwargs
) -> Attack:
    """An attack by registry name.

    Args:
        name: ``fgsm``, ``bim``, ``pgd``, ``mifgsm``, ``segpgd``, ``cospgd``, ``apgd``, ``sea``,
            ``dag``, ``asma`` or ``universal`` (which must be fitted on training slices before it
            is called), optionally with the adaptive suffixes ``+bpda`` / ``+eot``
            (e.g. ``pgd+bpda``),
            which attack a :class:`~advseg.defences.DefendedModel` through BPDA / EOT
            (``eot_samples`` draws, default 8).
        model: the segmentation model (logits ``(B, K, H, W)``).
        loss: a loss name from :data:`advseg.losses.LOSSES` or a callable ``(logits, y) -> (B,)``.
        eps: the budget (the paper's notebook used 0.009 under L-inf).
        **kwargs: the attack's options (``norm``, ``steps``, ``alpha``, ``targeted``, ...).

    Raises:
        UserError: unknown attack, loss or option (answered with the valid ones), bad budget.

    Example:
        >>> attack = create_attack("pgd", model, loss="bce", eps=8 / 255, steps=10)
        >>> x_adv = attack(images, masks)  # (B, C, H, W)
    """
    base, modes = parse_attack_name(name)
    cls = ATTACKS.get(base)
    unknown = sorted(set(kwargs) - set(attack_options(name)))
    if unknown:
        valid = ", ".join(attack_options(name))
        raise UserError(f"attack {name!r}: unknown option(s) {', '.join(unknown)}; valid: {valid}")
    samples = kwargs.pop("eot_samples", DEFAULT_EOT_SAMPLES)
    return cls(adaptive_model(model, modes, samples), loss, eps, **kwargs)


def attack_options(name: str) -> list[str]:
    """The keyword options an attack accepts (beyond model, loss and eps), in order.

    An unknown name (or adaptive suffix) is a :class:`UserError` listing the valid ones.
    """
    base, modes = parse_attack_name(name)
    options: list[str] = []
    for cls in ATTACKS.get(base).__mro__:
        if not issubclass(cls, Attack) or "__init__" not in vars(cls):
            continue
        for param in inspect.signature(cls.__init__).parameters.values():
            if param.kind is param.KEYWORD_ONLY and param.name not in options:
                options.append(param.name)
    if "eot" in modes:
        options.append("eot_samples")
    return options
