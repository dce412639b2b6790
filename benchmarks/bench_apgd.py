"""APGD's step against PGD's step, and what SEA saves by skipping slices already broken.

(1) APGD vs PGD: the same model, batch and number of steps; APGD's extra work per step is its
    momentum step, its best-iterate bookkeeping and its checkpoints (the same model calls: one
    forward and one backward per step, APGD's last step a forward only). Target: APGD's step
    within 1.1x of PGD's.
(2) SEA with and without ``skip_broken`` at a budget that breaks some slices early: the time of
    each and the (slice, member) runs each made.

Prints the times (best of the repeats, interleaved), the ratios and whether the target holds.

    python benchmarks/bench_apgd.py [--model unet] [--size 64] [--batch 16] [--steps 20]
"""

from __future__ import annotations

import argparse
import time

import torch

from advseg.allocator import keep_freed_memory
from advseg.attacks import create_attack
from advseg.losses import create_loss
from advseg.models.zoo import create_model

TARGET_APGD_OVER_PGD = 1.1


def blobs(n: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Bright squares (one class per channel) on a dark noisy background, and their masks."""
    g = torch.Generator().manual_seed(seed)
    x = 0.1 * torch.rand(n, 3, size, size, generator=g)
    y = torch.zeros(n, 3, size, size)
    side = max(size // 4, 2)
    for i in range(n):
        for k in range(3):
            r, c = torch.randint(0, size - side, (2,), generator=g).tolist()
            x[i, :, r : r + side, c : c + side] += 0.3 * (k + 1)
            y[i, k, r : r + side, c : c + side] = 1
    return x.clamp(0, 1), y


def trained_model(name: str, size: int, steps: int) -> torch.nn.Module:
    """A zoo model trained briefly on the blobs (so that attacks have work to do)."""
    torch.manual_seed(0)
    model = create_model(name, in_channels=3, classes=3)
    x, y = blobs(32, size, seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loss = create_loss("dicefocal")
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss(model(x), y).backward()
        optimizer.step()
    return model.eval()


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="unet", help="a zoo name (default: the plain U-Net)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--train-steps", type=int, default=30)
    args = parser.parse_args()
    keep_freed_memory()
    torch.manual_seed(0)
    model = trained_model(args.model, args.size, args.train_steps)
    x, y = blobs(args.batch, args.size, seed=2)
    eps = 8 / 255
    pgd = create_attack("pgd", model, "bce", eps, steps=args.steps)
    apgd = create_attack("apgd", model, "bce", eps, steps=args.steps)
    pgd(x, y), apgd(x, y)  # warm-up
    times = {"pgd": [], "apgd": []}
    for _ in range(args.repeats):  # interleaved, so drifts of the machine hit both alike
        for name, attack in (("pgd", pgd), ("apgd", apgd)):
            times[name].append(best_time(lambda a=attack: a(x, y), 1))
    t_pgd, t_apgd = min(times["pgd"]), min(times["apgd"])
    ratio = t_apgd / t_pgd
    threads = torch.get_num_threads()
    print(f"{args.model} {args.size}px batch {args.batch}, {args.steps} steps, {threads} threads")
    print(f"  pgd  {t_pgd:.3f} s  ({1000 * t_pgd / args.steps:.1f} ms/step)")
    print(f"  apgd {t_apgd:.3f} s  ({1000 * t_apgd / args.steps:.1f} ms/step)")
    ok = "holds" if ratio <= TARGET_APGD_OVER_PGD else "MISSED"
    print(f"  apgd/pgd step {ratio:.3f}x  (target <= {TARGET_APGD_OVER_PGD}x: {ok})")

    sea_eps = 0.1  # large enough that one member breaks some slices completely
    per_member = max(args.steps // 4, 1)  # sea's steps are per member
    skip = create_attack("sea", model, eps=sea_eps, steps=per_member)
    full = create_attack("sea", model, eps=sea_eps, steps=per_member, skip_broken=False)
    sea_times = {"skip": [], "full": []}
    for _ in range(max(args.repeats // 2, 1)):
        for name, attack in (("skip", skip), ("full", full)):
            sea_times[name].append(best_time(lambda a=attack: a(x, y), 1))
    t_skip, t_full = min(sea_times["skip"]), min(sea_times["full"])
    print(f"sea eps {sea_eps:g}, {per_member} steps for each of {len(skip.members)} members")
    print(f"  skip_broken  {t_skip:.3f} s, {skip.attacked} (slice, member) runs")
    print(f"  attack all   {t_full:.3f} s, {full.attacked} (slice, member) runs")
    print(f"  skipping saves {1 - t_skip / t_full:.0%} of the time "
          f"({full.attacked - skip.attacked} of {full.attacked} runs)")  # fmt: skip


if __name__ == "__main__":
    main()
