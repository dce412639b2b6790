"""The cost of adversarial training: time per training step of each method, as a ratio to plain.

One step is what ``advseg.train`` does per batch: ``AdversarialTraining.loss`` (the attack with
the parameters frozen, then the training forward), backward, AdamW step. Each method runs
``--warmup`` steps, then ``--steps`` timed steps, and keeps the fastest (as ``timeit`` does:
slower steps measure other processes on a shared machine). The methods are measured in rounds
(plain, fgsm-rs, pgd-k..., trades), ``--rounds`` times over, each keeping its best, so that a
change of load during the run touches every method alike. Expected ratios: fgsm-rs about 2x
(one extra forward + input backward), pgd-k about k + 1, trades about k + 2.

Usage:
    python benchmarks/bench_adversarial_training.py                 # plain U-Net at 64 px
    python benchmarks/bench_adversarial_training.py --model unet-tiny --size 32 --steps 1
"""

from __future__ import annotations

import argparse
import time

import torch

from advseg.allocator import keep_freed_memory
from advseg.defences import AdversarialConfig, AdversarialTraining
from advseg.losses import create_loss
from advseg.models import create_model


def step_seconds(
    method: str, attack_steps: int | None, model_name: str, size: int, batch: int, steps: int,
    warmup: int,
) -> float:  # fmt: skip
    """The fastest of ``steps`` full training steps with this adversarial training method."""
    torch.manual_seed(0)
    model = create_model(model_name).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    loss_fn = create_loss("dicefocal")
    config = AdversarialConfig(method=method, eps=0.03, steps=attack_steps)
    defence = AdversarialTraining(config, model, loss_fn, train_loss="dicefocal")
    image = torch.rand(batch, 3, size, size)
    mask = (torch.rand(batch, 3, size, size) > 0.7).float()
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        loss = defence.loss(model, image, mask, epoch=1, step=i, steps=warmup + steps)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="unet")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--pgd-steps", default="4,10", help="comma-separated PGD step counts")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0: default")
    args = parser.parse_args()
    keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    methods: list[tuple[str, str, int | None]] = [
        ("plain", "none", None),
        ("fgsm-rs", "fgsm-rs", None),
    ]
    methods += [(f"pgd-{k}", "pgd", int(k)) for k in args.pgd_steps.split(",") if k]
    methods += [("trades-4", "trades", 4)]
    print(
        f"CPU: {torch.get_num_threads()} threads, {args.model} at {args.size}, batch {args.batch}"
    )
    best: dict[str, float] = {}
    for _ in range(args.rounds):
        for label, method, k in methods:
            seconds = step_seconds(
                method, k, args.model, args.size, args.batch, args.steps, args.warmup
            )
            best[label] = min(best.get(label, float("inf")), seconds)
    plain = best["plain"]
    for label, _, _ in methods:
        print(f"  {label:10s} {best[label] * 1000:9.1f} ms/step  {best[label] / plain:5.2f}x plain")


if __name__ == "__main__":
    main()
