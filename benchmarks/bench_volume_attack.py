"""A PGD step on a volume through the sliding-window inference: time and peak memory.

Model: ``unet3d-tiny`` (1 channel in, 3 classes, frozen, eval), window ``--roi`` (32^3), overlap
0.5, Gaussian blending; the volume is ``roi + roi/2`` per axis, i.e. 2 x 2 x 2 = 8 windows.

Time (best of ``--repeats``, interleaved, in this process):
  step   one PGD gradient through advseg's inferer (``Attack.gradient``: recomputing backward);
  floor  the forward + backward of its windows: each window through the bare network with a graph
         and back-propagated (no blending, no loss): what any exact gradient must at least cost;
  monai  the same gradient through ``monai.inferers.sliding_window_inference`` with autograd on
         (every window's graph kept, MONAI issue 1420);
  blend  advseg's forward alone, no graph: the part of the step the floor does not pay for (the
         backward recomputes each window, so step = blend + floor + the loss and bookkeeping).
Target: step / floor <= 1.25. An exact gradient that keeps no window's graph pays one more
forward per window, so step / floor >= 1 + F / (F + B); with frozen parameters the backward B
computes input gradients only and costs about one forward F, so that floor is about 1.5: the
line ``step / (blend + floor)`` says how much the inferer adds beyond the recomputation.

Peak memory (each case in a fresh subprocess, torch's CPU allocations being invisible to
tracemalloc): the step's rise of the peak resident memory, the kernel's high-water mark (VmHWM)
after the step, reset to the resident size just before it (``/proc/self/clear_refs``), minus that
size; ``resource.getrusage`` maxrss where the reset is not allowed. advseg's step on a volume of
1 window and of 8 windows (and 27), MONAI's on 1 and 8, glibc's mmap threshold fixed at 128 KiB
(so freed activations leave the process and the peak is what was alive, not fragmentation).
Target: advseg 8 / 1 <= 1.5.

    python benchmarks/bench_volume_attack.py [--roi 32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

from advseg.attacks import create_attack, frozen
from advseg.inference import SlidingWindow
from advseg.models import create_model

TARGET_TIME = 1.25
TARGET_MEMORY = 1.5


def setup(roi: int, windows_per_axis: int, way: str):
    """The frozen tiny 3D U-Net, the inferer (or MONAI's), a volume, its masks, and an attack."""
    torch.manual_seed(0)
    model = create_model("unet3d-tiny", in_channels=1, classes=3).eval().requires_grad_(False)
    size = roi + (windows_per_axis - 1) * roi // 2  # overlap 0.5: windows every roi / 2
    x = torch.rand(1, 1, size, size, size)
    y = (torch.rand(1, 3, size, size, size) > 0.5).float()
    if way == "monai":
        from monai.inferers import sliding_window_inference

        class Monai(torch.nn.Module):  # MONAI's inferer as the attack's model, gradients on
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, v):
                return sliding_window_inference(v, (roi,) * 3, 1, self.model, 0.5, "gaussian")

        inferer = Monai()
    else:
        inferer = SlidingWindow(model, (roi,) * 3, overlap=0.5)
    return model, inferer, x, y


def pgd_step(inferer, x, y) -> None:
    attack = create_attack("pgd", inferer, "bce", 4 / 255, steps=1)
    with frozen(inferer):
        attack.gradient(x, y)


def window_floor(model, inferer: SlidingWindow, x) -> None:
    """Each window forward with a graph and backward of a fixed gradient, one at a time."""
    grads = None
    for s in inferer.windows(x.shape[2:]):
        window = x[(slice(None), slice(None), *s)].detach().requires_grad_(True)
        out = model(window)
        grads = torch.ones_like(out) if grads is None else grads
        torch.autograd.grad(out, window, grads)


def blend(inferer: SlidingWindow, x) -> None:
    with torch.no_grad():
        inferer(x)


def time_ways(roi: int, repeats: int) -> dict[str, float]:
    model, ours, x, y = setup(roi, 2, "advseg")
    _, monai, _, _ = setup(roi, 2, "monai")
    ways = {
        "step": lambda: pgd_step(ours, x, y),
        "floor": lambda: window_floor(model, ours, x),
        "monai": lambda: pgd_step(monai, x, y),
        "blend": lambda: blend(ours, x),
    }
    best = dict.fromkeys(ways, float("inf"))
    for fn in ways.values():
        fn()  # warm up
    for r in range(repeats):
        names = list(ways)
        for name in (
            names[r % len(names) :] + names[: r % len(names)]
        ):  # rotated, so no way always goes first
            start = time.perf_counter()
            ways[name]()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def status_kb(field: str) -> int:
    """A ``/proc/self/status`` field in kB (VmRSS, VmHWM)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1])


def step_peak_kb(roi: int, windows: int, way: str) -> int:
    """kB by which one step raises the resident memory above its level before (this process)."""
    _, inferer, x, y = setup(roi, windows, way)
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # VmHWM := VmRSS
        before, field = status_kb("VmRSS"), "VmHWM"
    except OSError:
        before, field = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, ""
    pgd_step(inferer, x, y)
    after = status_kb(field) if field else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return after - before


def peak_in_subprocess(roi: int, windows: int, way: str) -> int:
    """:func:`step_peak_kb` in a fresh process (no memory kept from an earlier case)."""
    code = (
        "import json, sys; sys.argv = ['x']; import bench_volume_attack as b; "
        f"print(json.dumps(b.step_peak_kb({roi}, {windows}, {way!r})))"
    )
    # A fixed mmap threshold: glibc otherwise raises it after the first large free and serves
    # later windows from a heap that keeps its peak, so the peak would measure fragmentation.
    env = {
        **os.environ,
        "MALLOC_MMAP_THRESHOLD_": "131072",
        "PYTHONPATH": os.pathsep.join(
            [os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]
        ),
    }
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          check=True)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--roi", type=int, default=32, help="window edge (default 32)")
    parser.add_argument("--repeats", type=int, default=5, help="timing repeats (default 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    size = args.roi + args.roi // 2
    print(f"unet3d-tiny, window {args.roi}^3, overlap 0.5, volume {size}^3 (8 windows), "
          f"{args.threads} thread(s)")  # fmt: skip
    best = time_ways(args.roi, args.repeats)
    for name, seconds in best.items():
        print(f"  {name:<6} {seconds * 1e3:8.1f} ms")
    ratio = best["step"] / best["floor"]
    print(f"time: step/floor {ratio:.2f} (target <= {TARGET_TIME}), "
          f"monai/floor {best['monai'] / best['floor']:.2f}, step/monai "
          f"{best['step'] / best['monai']:.2f}, step/(blend+floor) "
          f"{best['step'] / (best['blend'] + best['floor']):.2f}")  # fmt: skip
    peaks = {
        (way, n): peak_in_subprocess(args.roi, n, way)
        for way, n in [("advseg", 1), ("advseg", 2), ("advseg", 3), ("monai", 1), ("monai", 2)]
    }
    for (way, n), kb in peaks.items():
        print(f"  peak {way:<6} {n**3:>2} window(s): +{kb / 1024:7.1f} MiB")
    one = max(peaks["advseg", 1], 1)
    print(f"memory: advseg 8/1 {peaks['advseg', 2] / one:.2f} (target <= {TARGET_MEMORY}), "
          f"advseg 27/1 {peaks['advseg', 3] / one:.2f}, monai 8/1 "
          f"{peaks['monai', 2] / max(peaks['monai', 1], 1):.2f}, monai 8 / advseg 8 "
          f"{peaks['monai', 2] / max(peaks['advseg', 2], 1):.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
