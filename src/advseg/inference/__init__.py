"""How logits are made from an image: the layer between a model and whoever calls it.

An attack, an evaluation or a validation pass sees one differentiable function from the image to
logits on the image's grid. For a 2D model on a slice that is the model itself; for a 3D network
on a volume it is :class:`SlidingWindow` (overlapping windows, Gaussian blending, optional
mirroring, gradients whose memory does not grow with the volume). A low layer: it imports torch
only, never the evaluation, experiment, report or CLI modules.
"""

from advseg.inference.sliding import (
    KEEP_GRAPHS,
    SlidingWindow,
    gaussian_weights,
    window_slices,
    window_starts,
)

__all__ = ["KEEP_GRAPHS", "SlidingWindow", "gaussian_weights", "window_slices", "window_starts"]
