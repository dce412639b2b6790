"""The FGSM eps sweep at the cost of one gradient: 7 eps x 3 losses against one eps.

On the same stream of batches (the plain U-Net, this machine's CPU or GPU), three ways:

(one)   one eps, the paper's three losses: :func:`advseg.evaluate.attack_batch` (one forward with
        input gradient, one backward per loss, one ``inference_mode`` forward per loss's images);
(cells) the sweep cell by cell, as advseg did before: ``attack_batch`` once per eps (7 gradient
        forwards, 21 backwards, 21 adversarial forwards);
(sweep) the sweep sharing the gradient: :func:`advseg.evaluate.sweep_batch` (1 gradient forward,
        3 backwards, then 21 adversarial forwards: one per (loss, eps), which the records need).

Each way is timed twice: "images" makes only the adversarial images and the clean prediction
(:func:`advseg.evaluate.sweep_images`: the attack's own work, whose cost is the gradient, so a
shared gradient makes the sweep nearly free); "scored" adds the adversarial forward of every
(loss, eps) that a cell's records need (those 21 forwards cannot be shared: the images differ;
the per-slice metrics, HD95 above all, come on top of both and are not timed here). Prints
the times (best of the repeats, interleaved and rotated), the ratios sweep/one and cells/one,
and whether the target holds (images: sweep/one <= 1.3).

The scored sweep cannot reach 1.3x of one scored eps by counting: one eps is a gradient
forward, 3 backwards and 3 scoring forwards; the sweep adds 18 scoring forwards of distinct
images. So the benchmark also times one plain ``inference_mode`` forward of the batches
("forward") and prints the floor any engine that scores every (loss, eps) meets, images sweep +
21 forwards, and the scored sweep's ratio to it (1.0: nothing left to share). On a CPU,
concatenating the 21 forwards into bigger batches does not help (measured: 7 x 16 images 0.45 s,
1 x 112 images 0.69 s, unet 64 px), so the engine keeps one forward per (loss, eps).

    python benchmarks/bench_sweep.py [--size 64] [--batch 16] [--batches 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import torch

from advseg.allocator import keep_freed_memory
from advseg.attacks import create_attack
from advseg.attacks.base import frozen, model_logits
from advseg.evaluate import DEFAULT_BATCH_SIZE, attack_batch, sweep_batch, sweep_images
from advseg.models.zoo import create_model

LOSSES = ["bce", "focal", "dicefocal"]
SWEEP = [0.001, 0.003, 0.005, 0.009, 0.015, 0.03, 0.05]  # configs/paper.yaml's sweep
TARGET = 1.3  # the sweep's images at most 1.3x the time of one eps's


def batch_stream(n, batch, size, device):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        x = torch.rand(batch, 3, size, size, generator=g)
        y = (torch.rand(batch, 3, size, size, generator=g) > 0.8).float()
        out.append((x.to(device), y.to(device)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=64, help="image side (the paper: 224)")
    parser.add_argument("--batch", type=int, default=DEFAULT_BATCH_SIZE, help="advseg's default")
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", default="unet", help="a zoo name")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument(
        "--eps", default=",".join(map(str, SWEEP)), help="the sweep, comma-separated"
    )
    args = parser.parse_args()
    keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    model = create_model(args.model).to(device).eval()
    batches = batch_stream(args.batches, args.batch, args.size, device)
    values = [float(v) for v in args.eps.split(",")]
    sweep = [[create_attack("fgsm", model, loss, eps) for loss in LOSSES] for eps in values]
    one = sweep[values.index(0.009) if 0.009 in values else 0]  # the paper's eps

    def forward(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        amp = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")
        with frozen(model), amp, torch.inference_mode():
            return model_logits(model, x).float()

    ways = {
        "forward": forward,
        "images one": lambda x, y: sweep_images(model, [one], x, y),
        "images cells": lambda x, y: [sweep_images(model, [atk], x, y) for atk in sweep],
        "images sweep": lambda x, y: sweep_images(model, sweep, x, y),
        "scored one": lambda x, y: attack_batch(model, one, x, y),
        "scored cells": lambda x, y: [attack_batch(model, atk, x, y) for atk in sweep],
        "scored sweep": lambda x, y: sweep_batch(model, sweep, x, y),
    }
    for fn in ways.values():  # warm-up on one image
        fn(batches[0][0][:1], batches[0][1][:1])
    times: dict[str, list[float]] = {k: [] for k in ways}
    keys = list(ways)
    for r in range(args.repeats):  # interleaved and rotated: other processes' load hits all ways
        for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
            start = time.perf_counter()
            for x, y in batches:
                ways[key](x, y)
            sync()
            times[key].append(time.perf_counter() - start)
    best = {k: min(v) for k, v in times.items()}
    shape = f"{args.batches} x {args.batch} x 3 x {args.size}^2"
    print(f"device {device}, threads {torch.get_num_threads()}, {args.model}, images {shape}, "
          f"FGSM at {len(values)} eps x {len(LOSSES)} losses ({', '.join(LOSSES)})")  # fmt: skip
    print("  ".join(f"{k} {v:.3f}s" for k, v in best.items()))
    for kind in ("images", "scored"):
        sweep_ratio = best[f"{kind} sweep"] / best[f"{kind} one"]
        cells_ratio = best[f"{kind} cells"] / best[f"{kind} one"]
        print(f"{kind}: sweep/one {sweep_ratio:.2f}  cells/one {cells_ratio:.2f}")
    scored = len(values) * len(LOSSES)
    floor = best["images sweep"] + scored * best["forward"]
    print(
        f"scored sweep floor (images sweep + {scored} forwards) {floor:.3f}s: "
        f"scored sweep / floor {best['scored sweep'] / floor:.2f}"
    )
    ratio = best["images sweep"] / best["images one"]
    print(f"target: images sweep/one <= {TARGET} {'met' if ratio <= TARGET else 'MISSED'}")


if __name__ == "__main__":
    main()
