"""Shared test settings: small, deterministic, two CPU cores."""

from __future__ import annotations

import torch

torch.set_num_threads(1)
