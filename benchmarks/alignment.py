"""Image/mask alignment of the preprocessing, and the export round trip, on a data set.

For every slice and class with at least ``--min-pixels`` source pixels:

- ``offset``: the distance (model pixels) between the centroid of the cached binary mask and the
  centroid of the same mask resized as a float with the image's own interpolation (the geometry
  the image has: area averaging when shrinking, bilinear when enlarging);
- ``dice``: the class's Dice, pooled over the data set, between the source label and the cached
  mask put back on the source grid with ``restore_slice`` (what ``advseg export`` writes as
  ``truth_mask``).
- ``coverage dice``: the same for each model pixel's coverage of the class (the label
  area-averaged onto the model grid, as the image is) restored the same way and kept where
  >= 0.5: what the model grid could carry if masks were not binary. At 64 px it is 0.99 where the
  binary mask gives 0.95-0.96 (phantom, synthetic CT): binarisation, not geometry, is the loss.

    PYTHONPATH=src python benchmarks/alignment.py DATA --size 64 [--resize pad|stretch]
"""

from __future__ import annotations

import argparse
import json

import cv2
import numpy as np

from advseg.data import DataConfig, restore_slice, slice_geometry
from advseg.data.cache import _Decoder, _units
from advseg.data.index import index_classes
from advseg.data.load import build_index
from advseg.data.preprocess import PreprocessConfig, fit_square, fitted_size, preprocess_slice
from advseg.data.rle import rle_decode


def centroid(mask: np.ndarray) -> np.ndarray:
    """(row, column) centroid of a non-negative ``(H, W)`` weight map."""
    rows, cols = np.indices(mask.shape)
    total = mask.sum()
    return np.array([(rows * mask).sum() / total, (cols * mask).sum() / total])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--resize", default="pad")
    parser.add_argument("--mask-resize", default=None)
    parser.add_argument("--min-pixels", type=int, default=50)
    args = parser.parse_args()
    extra = {"mask_resize": args.mask_resize} if args.mask_resize else {}
    config = PreprocessConfig(size=args.size, resize=args.resize, **extra)
    index, _ = build_index(DataConfig(path=args.data, preprocess=config))
    classes = index_classes(index)
    geometry = slice_geometry(index, config)
    decode = _Decoder(index, classes, config)
    offsets: list[float] = []
    overlap = np.zeros(len(classes))
    sizes = np.zeros(len(classes))
    covered = np.zeros((2, len(classes)))
    for unit in _units(index):
        for pos, image in zip(unit, decode._raw_images(unit), strict=True):
            h, w = int(index["height"].iat[pos]), int(index["width"].iat[pos])
            masks = np.stack([rle_decode(index[c].iat[pos], h, w) for c in classes])
            _, cached = preprocess_slice(image, masks, config)
            fh, fw = fitted_size(h, w, config.size, config.resize)
            how = cv2.INTER_AREA if fh * fw < h * w else cv2.INTER_LINEAR
            back = restore_slice(cached > 0, geometry.iloc[pos], h, w)
            for k in range(len(classes)):
                if masks[k].sum() < args.min_pixels:
                    continue
                soft = fit_square(masks[k].astype(np.float32), config.size, config.resize, how)
                kept = restore_slice(soft, geometry.iloc[pos], h, w) >= 0.5
                covered[0, k] += 2 * (kept & (masks[k] > 0)).sum()
                covered[1, k] += kept.sum() + (masks[k] > 0).sum()
                if cached[k].sum() > 0:
                    offsets.append(float(np.linalg.norm(centroid(cached[k]) - centroid(soft))))
                overlap[k] += 2 * (back[k] & (masks[k] > 0)).sum()
                sizes[k] += back[k].sum() + (masks[k] > 0).sum()
    dice = {c: round(float(o / s), 4) for c, o, s in zip(classes, overlap, sizes, strict=True)}
    result = {
        "data": args.data,
        "preprocess": {"size": config.size, "resize": config.resize,
                       "mask_resize": config.mask_resize},
        "slices": len(index),
        "masks": len(offsets),
        "offset_mean_px": round(float(np.mean(offsets)), 4),
        "offset_max_px": round(float(np.max(offsets)), 4),
        "export_dice": dice,
        "export_dice_mean": round(float(np.mean(list(dice.values()))), 4),
        "coverage_dice_mean": round(float(np.mean(covered[0] / covered[1])), 4),
    }  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
