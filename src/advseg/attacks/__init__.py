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
from advseg.attacks.alma_prox import ALMAProx
from advseg.attacks.apgd import APGD
from advseg.attacks.asma import ASMA
from advseg.attacks.base import ATTACKS, Attack, check_eps, frozen, model_logits
from advseg.attacks.biasfield import BiasField
from advseg.attacks.bim import BIM
from advseg.attacks.cospgd import CosPGD
from advseg.attacks.dag import DAG
from advseg.attacks.elastic import Elastic
from advseg.attacks.fgsm import FGSM
from advseg.attacks.gamma import Gamma
from advseg.attacks.mifgsm import MIFGSM
from advseg.attacks.minimal import MinimalNorm
from advseg.attacks.padam import PAdam
from advseg.attacks.pdpgd import PDPGD
from advseg.attacks.pgd import PGD
from advseg.attacks.sea import SEA
from advseg.attacks.segpgd import SegPGD
from advseg.attacks.universal import Universal
from advseg.attacks.vafa import VAFA
from advseg.catalogue import parse_attack_name
from advseg.errors import UserError
from advseg.losses import PerSampleLoss

__all__ = ["APGD", "ASMA", "ATTACKS", "BIM", "DAG", "FGSM", "MIFGSM", "PDPGD", "PGD", "SEA", "VAFA",
           "ALMAProx", "Attack", "BiasField", "CosPGD", "Elastic", "Gamma", "MinimalNorm", "PAdam",
           "SegPGD", "Universal",
           "attack_options", "check_eps", "check_option_values", "create_attack", "frozen",
           "model_logits", "parse_attack_name"]  # fmt: skip


def create_attack(
    name: str, model: nn.Module, loss: str | PerSampleLoss = "bce", eps: float = 0.009, **kwargs
) -> Attack:
    """An attack by registry name.

    Args:
        name: ``fgsm``, ``bim``, ``pgd``, ``mifgsm``, ``segpgd``, ``cospgd``, ``apgd``, ``sea``,
            ``dag``, ``asma``, the plausible ``biasfield``, ``elastic`` and ``gamma`` (budgets in
            their own terms: :mod:`advseg.attacks.plausible`), the minimal-norm ``alma-prox`` and
            ``pdpgd`` (their ``min_eps``), the frequency-domain ``vafa`` (eps: its largest
            quantisation step; an SSIM bound) or ``universal`` (which must be
            fitted on training slices before it is called), optionally with the adaptive
            suffixes ``+bpda`` / ``+eot`` (e.g. ``pgd+bpda``),
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


def check_option_values(name: str, options: dict, where: str) -> None:
    """Refuse an option value of another type than its default's, naming it: ``random_start=
    maybe`` (a bool), ``seed=abc`` or ``seed=-1`` (a seed, :mod:`advseg.limits`), ``steps=2.5``
    (a whole number), ``loss_kwargs=[1, 2]`` (a mapping). Options an attack does not take are
    left to the caller (its message lists what each attack takes).

    Args:
        name: the attack (registry name, maybe with an adaptive suffix).
        options: ``key -> value`` as given (YAML-typed).
        where: the prefix of each key in messages: ``--attack-option `` or ``attacks[0].kwargs.``.
    """
    import math

    from advseg.attacks.refine import parse_refine
    from advseg.limits import check_seed

    base, _ = parse_attack_name(name)
    defaults: dict = {}
    for cls in reversed(ATTACKS.get(base).__mro__):
        if issubclass(cls, Attack) and "__init__" in vars(cls):
            for param in inspect.signature(cls.__init__).parameters.values():
                if param.kind is param.KEYWORD_ONLY:
                    defaults[param.name] = param.default
    for key, value in options.items():
        if key not in defaults:
            continue
        default, said = defaults[key], f"{where}{key}"
        if key == "seed":
            check_seed(value, said)
        elif key == "refine":  # the minimal-norm attacks' ROUNDSxSTEPS, on or off
            parse_refine(value, said)
        elif key == "loss_kwargs" and value is not None and not isinstance(value, dict):
            raise UserError(f"{said}: expected a mapping like {{gamma: 2.0}}, got {value!r}")
        elif isinstance(default, bool) and not isinstance(value, bool):
            raise UserError(f"{said}: expected true or false, got {value!r}")
        elif isinstance(default, int) and not isinstance(default, bool):
            if isinstance(value, bool) or not isinstance(value, int):
                raise UserError(f"{said}: expected a whole number, got {value!r}")
        elif isinstance(default, float):
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or not math.isfinite(value):
                raise UserError(f"{said}: expected a finite number, got {value!r}")


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
