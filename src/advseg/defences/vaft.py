"""VAFT's frequency-consistency term: how far the adversarial prediction's spectrum is from the
clean one's.

Hanif et al., "Frequency Domain Adversarial Training for Robust Volumetric Medical
Segmentation", MICCAI 2023, https://arxiv.org/abs/2307.07269: a model is trained on clean
patches and on their VAFA versions (:class:`advseg.attacks.VAFA`), with the loss
``L(f(x), y) + L(f(x'), y) + ||DCT(f(x)) - DCT(f(x'))||_1 / ||DCT(f(x))||_1``, the DCT over the
whole patch of logits (their code: one 96^3 block, the patch). The last term is
:func:`frequency_consistency`; the training loop's ``--adv-train vaft`` adds it
(:class:`advseg.defences.AdversarialTraining`).
"""

from __future__ import annotations

from torch import Tensor

from advseg.attacks.dct import dctn


def frequency_consistency(clean_logits: Tensor, adv_logits: Tensor) -> Tensor:
    """The normalised L1 distance of the logits' orthonormal DCTs over their spatial axes.

    Args:
        clean_logits, adv_logits: ``(B, K, *S)`` (2 or 3 spatial axes).

    Returns:
        A scalar: ``sum |DCT(a) - DCT(b)| / sum |DCT(a)|`` over the whole batch, as the paper's
        code computes it (0 when the predictions agree).
    """
    dims = clean_logits.dim() - 2
    a, b = dctn(clean_logits.float(), dims), dctn(adv_logits.float(), dims)
    return (a - b).abs().sum() / a.abs().sum().clamp_min(1e-12)
