"""Tiny models and images for the attack and defence tests: seconds to train on a CPU.

``blobs`` are images with bright squares and their masks; ``tiny_net`` a three-layer convolution
net; ``fit`` trains one a few dozen Adam steps (deterministic under conftest's one thread).
"""

from __future__ import annotations

import torch
from torch import nn

from advseg.losses import create_loss


def tiny_net(classes: int = 3, seed: int = 0, batch_norm: bool = True) -> nn.Module:
    """Conv 3x3 (8) [BatchNorm] ReLU, conv 3x3 (8) ReLU, conv 1x1 (classes), seeded."""
    torch.manual_seed(seed)
    norm = [nn.BatchNorm2d(8)] if batch_norm else []
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), *norm, nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, classes, 1),
    )  # fmt: skip


def blobs(n: int, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images with bright squares and their masks; class k is a square in channel-k brightness."""
    g = torch.Generator().manual_seed(seed)
    x = 0.1 * torch.rand(n, 3, size, size, generator=g)
    y = torch.zeros(n, 3, size, size)
    for i in range(n):
        for k in range(3):
            if torch.rand(1, generator=g) < 0.7:
                r, c = torch.randint(0, size - 6, (2,), generator=g).tolist()
                x[i, k, r : r + 6, c : c + 6] += 0.6
                y[i, k, r : r + 6, c : c + 6] = 1
    return x.clamp(0, 1), y


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> nn.Module:
    """``steps`` Adam steps (lr 2e-2) of the Dice-focal loss on the whole batch; eval mode."""
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    loss = create_loss("dicefocal")
    for _ in range(steps):
        optimizer.zero_grad()
        loss(model(x), y).backward()
        optimizer.step()
    return model.eval()
