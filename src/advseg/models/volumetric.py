"""The 3D networks of the zoo, MONAI's implementations built by name.

Each maps volumes ``(B, C, D, H, W)`` to logits ``(B, K, D, H, W)`` and is run on a whole volume
through :class:`advseg.inference.SlidingWindow` with the entry's window (``ZooEntry.roi``):

- ``unet3d``: nnU-Net's 3d_fullres U-Net as MONAI's ``DynUNet`` (six stages 32 -> 320 features,
  3x3x3 kernels, stride 2 from the second stage, instance norm, leaky ReLU 0.01, no deep
  supervision at inference); window 128^3, sizes multiples of 32.
- ``segresnet``: MONAI's ``SegResNet`` as in its BraTS tutorial (16 initial filters, blocks
  down 1-2-2-4, up 1-1-1); window 96^3, multiples of 8.
- ``unetr``: MONAI's ``UNETR`` (feature size 16, ViT-B: hidden 768, MLP 3072, 12 heads, instance
  norm, residual blocks), built for its window: 96^3 only.
- ``swinunetr``: MONAI's ``SwinUNETR`` (feature size 48, as in the BTCV tutorial); window 96^3,
  multiples of 32.
- ``unet3d-tiny``: not from a paper; a four-stage ``DynUNet`` (4 -> 32 features, 0.09M
  parameters) for tests and the demo; window 32^3, multiples of 8.

MONAI is imported when a network is built, not when the zoo is imported.
"""

from __future__ import annotations

from torch import nn

_LEAKY = ("leakyrelu", {"negative_slope": 0.01, "inplace": True})


def build_volumetric(arch: str, features: tuple[int, ...], roi: tuple[int, ...],
                     in_channels: int, classes: int) -> nn.Module:  # fmt: skip
    """A 3D MONAI network by architecture name (``DynUNet``, ``SegResNet``, ``UNETR``,
    ``SwinUNETR``); ``features`` are DynUNet's filters, SegResNet's initial filters, UNETR's and
    SwinUNETR's feature size; ``roi`` is UNETR's fixed input size."""
    from monai.networks import nets

    if arch == "DynUNet":
        stages = len(features)
        strides = [1] + [2] * (stages - 1)
        return nets.DynUNet(
            spatial_dims=3, in_channels=in_channels, out_channels=classes,
            kernel_size=[3] * stages, strides=strides, upsample_kernel_size=strides[1:],
            filters=list(features), norm_name="instance", act_name=_LEAKY, res_block=False,
        )  # fmt: skip
    if arch == "SegResNet":
        return nets.SegResNet(
            spatial_dims=3, init_filters=features[0], in_channels=in_channels,
            out_channels=classes, blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1),
        )  # fmt: skip
    if arch == "UNETR":
        return nets.UNETR(
            in_channels, classes, img_size=roi, feature_size=features[0], hidden_size=768,
            mlp_dim=3072, num_heads=12, norm_name="instance", res_block=True,
        )  # fmt: skip
    if arch == "SwinUNETR":
        return nets.SwinUNETR(
            in_channels=in_channels, out_channels=classes, feature_size=features[0], spatial_dims=3
        )
    raise ValueError(f"unknown 3D architecture {arch!r}")
