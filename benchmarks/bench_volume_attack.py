"""A PGD step on a volume through the sliding-window inference: time and peak memory.

Model: ``unet3d-tiny`` (1 channel in, 3 classes, frozen, eval), window ``--roi`` (32^3), overlap
0.5, Gaussian blending, ``--window-batch`` windows per model call; the volume is
``roi + (n - 1) roi / 2`` per axis, i.e. n^3 windows (8 and 27 below).

Time (best of ``--repeats``, interleaved, in this process), on 8 windows and on 27:
  step k  one PGD gradient through advseg's inferer (``Attack.gradient``), ``keep_graphs=k``:
          the forward keeps the last k windows' graphs, the backward recomputes the others;
          k = 0 and the default (``KEEP_GRAPHS``);
  floor   the forward + backward of its windows: each window batch through the bare network
          with a graph and back-propagated (the same batching; no blending, no loss): what any
          exact gradient must at least cost;
  monai   the same gradient through ``monai.inferers.sliding_window_inference`` with autograd
          on (every window's graph kept, MONAI issue 1420);
  blend   advseg's forward alone, no graph.
Target: step / floor <= 1.25 on 8 windows with the default. A recomputed window pays one more
forward, so step / floor ~ 1 + (n - k) / n * F / (F + B) (F, B a window's forward and its
input backward); ``step / (blend + floor)`` at k = 0 says what the inferer adds beyond that.

Peak memory (each case in a fresh subprocess, torch's CPU allocations being invisible to
tracemalloc): the step's rise of the peak resident memory, the kernel's high-water mark (VmHWM)
after the step, reset to the resident size just before it (``/proc/self/clear_refs``), minus that
size; ``resource.getrusage`` maxrss where the reset is not allowed. advseg's step (k = 0 and the
default) on volumes of 1, 8, 27 and 64 windows, MONAI's on 1 and 8, glibc's mmap threshold fixed
at 128 KiB (so freed activations leave the process and the peak is what was alive, not
fragmentation). Target: advseg 8 / 1 <= 1.5 with the default.

``--curve`` adds the trade-off on 8 windows: step / floor and memory 8 / 1 for k = 0..8.

    python benchmarks/bench_volume_attack.py [--roi 32] [--repeats 5] [--curve]
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
from advseg.inference import KEEP_GRAPHS, SlidingWindow
from advseg.models import create_model

TARGET_TIME = 1.25
TARGET_MEMORY = 1.5


def setup(roi: int, windows_per_axis: int, way: str, keep: int = KEEP_GRAPHS, batch: int = 1):
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
                return sliding_window_inference(v, (roi,) * 3, batch, self.model, 0.5, "gaussian")

        inferer = Monai()
    else:
        inferer = SlidingWindow(model, (roi,) * 3, overlap=0.5, batch_size=batch, keep_graphs=keep)
    return model, inferer, x, y


def pgd_step(inferer, x, y) -> None:
    attack = create_attack("pgd", inferer, "bce", 4 / 255, steps=1)
    with frozen(inferer):
        attack.gradient(x, y)


def window_floor(model, inferer: SlidingWindow, x) -> None:
    """Each window batch forward with a graph and backward of a fixed gradient, one at a time."""
    grads = None
    for batch in inferer._batches(x.shape[0], inferer.windows(x.shape[2:])):
        inputs = torch.cat([x[(b, slice(None), *s)][None] for b, s in batch]).requires_grad_(True)
        out = model(inputs)
        grads = torch.ones_like(out) if grads is None or grads.shape != out.shape else grads
        torch.autograd.grad(out, inputs, grads)


def blend(inferer: SlidingWindow, x) -> None:
    with torch.no_grad():
        inferer(x)


def time_ways(roi: int, n: int, keeps: list[int], repeats: int, batch: int, monai: bool = True
              ) -> dict[str, float]:  # fmt: skip
    """Best seconds of each way on a volume of n^3 windows."""
    model, ours, x, y = setup(roi, n, "advseg", batch=batch)
    ways = {"floor": lambda: window_floor(model, ours, x), "blend": lambda: blend(ours, x)}
    for k in keeps:
        inferer = setup(roi, n, "advseg", keep=k, batch=batch)[1]
        ways[f"step {k}"] = lambda inferer=inferer: pgd_step(inferer, x, y)
    if monai:
        theirs = setup(roi, n, "monai", batch=batch)[1]
        ways["monai"] = lambda: pgd_step(theirs, x, y)
    best = dict.fromkeys(ways, float("inf"))
    for fn in ways.values():
        fn()  # warm up
    names = list(ways)
    for r in range(repeats):  # rotated, so no way always goes first
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.process_time()
            ways[name]()
            best[name] = min(best[name], time.process_time() - start)
    return best


def status_kb(field: str) -> int:
    """A ``/proc/self/status`` field in kB (VmRSS, VmHWM)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1])


def step_peak_kb(roi: int, windows: int, way: str, keep: int, batch: int) -> int:
    """kB by which one step raises the resident memory above its level before (this process)."""
    _, inferer, x, y = setup(roi, windows, way, keep=keep, batch=batch)
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # VmHWM := VmRSS
        before, field = status_kb("VmRSS"), "VmHWM"
    except OSError:
        before, field = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, ""
    pgd_step(inferer, x, y)
    after = status_kb(field) if field else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return after - before


def peak_in_subprocess(roi: int, windows: int, way: str, keep: int, batch: int) -> int:
    """:func:`step_peak_kb` in a fresh process (no memory kept from an earlier case)."""
    code = (
        "import json, sys; sys.argv = ['x']; import torch; torch.set_num_threads(1); "
        "import bench_volume_attack as b; "
        f"print(json.dumps(b.step_peak_kb({roi}, {windows}, {way!r}, {keep}, {batch})))"
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
    parser.add_argument("--window-batch", type=int, default=1,
                        help="windows per model call, in every way (default 1)")  # fmt: skip
    parser.add_argument("--curve", action="store_true",
                        help="also k = 0..8 on 8 windows (default off)")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    roi, batch, k = args.roi, args.window_batch, KEEP_GRAPHS
    print(f"unet3d-tiny, window {roi}^3, overlap 0.5, {batch} window(s) per call, "
          f"{args.threads} thread(s), default keep_graphs {k}")  # fmt: skip
    for n in (2, 3):
        best = time_ways(roi, n, [0, k], args.repeats, batch)
        floor = best["floor"]
        print(
            f"{n**3} windows (volume {roi + (n - 1) * roi // 2}^3): "
            + ", ".join(f"{name} {sec * 1e3:.0f} ms" for name, sec in best.items())
        )
        print(f"  time / floor: step k=0 {best['step 0'] / floor:.2f}, step k={k} "
              f"{best[f'step {k}'] / floor:.2f} (target <= {TARGET_TIME}), monai "
              f"{best['monai'] / floor:.2f}; step k=0 / (blend + floor) "
              f"{best['step 0'] / (best['blend'] + floor):.2f}")  # fmt: skip
    cases = [("advseg", n, keep) for keep in (0, k) for n in (1, 2, 3, 4)]
    cases += [("monai", 1, 0), ("monai", 2, 0)]
    peaks = {case: peak_in_subprocess(roi, case[1], case[0], case[2], batch) for case in cases}
    for (way, n, keep), kb in peaks.items():
        name = f"{way} k={keep}" if way == "advseg" else way
        print(f"  peak {name:<10} {n**3:>2} window(s): +{kb / 1024:7.1f} MiB")
    for keep in (0, k):
        one = max(peaks["advseg", 1, keep], 1)
        print(f"memory k={keep}: 8/1 {peaks['advseg', 2, keep] / one:.2f}, 27/1 "
              f"{peaks['advseg', 3, keep] / one:.2f}, 64/1 {peaks['advseg', 4, keep] / one:.2f}"
              f" (target 8/1 <= {TARGET_MEMORY})")  # fmt: skip
    print(
        f"memory monai: 8/1 {peaks['monai', 2, 0] / max(peaks['monai', 1, 0], 1):.2f}, "
        f"monai 8 / advseg k={k} 8 {peaks['monai', 2, 0] / max(peaks['advseg', 2, k], 1):.2f}"
    )
    if args.curve:
        keeps = list(range(9))
        best = time_ways(roi, 2, keeps, args.repeats, batch, monai=False)
        print("trade-off on 8 windows: k, step / floor, memory 8 / 1 (both k)")
        for keep in keeps:
            one = peak_in_subprocess(roi, 1, "advseg", keep, batch)
            eight = peak_in_subprocess(roi, 2, "advseg", keep, batch)
            print(
                f"  k={keep}: time {best[f'step {keep}'] / best['floor']:.2f}, memory "
                f"{eight / max(one, 1):.2f} (+{eight / 1024:.0f} / +{one / 1024:.0f} MiB)"
            )


if __name__ == "__main__":
    main()
