"""Training throughput (images/s) of the zoo models: memory format on the CPU, precision on a GPU.

One training step is what ``advseg.train`` does per batch: forward (under autocast when not fp32),
Dice+Focal loss, backward, AdamW step. Each setting runs ``--warmup`` steps, then times ``--steps``
steps one by one and keeps the fastest (as ``timeit`` does: slower steps measure other processes
on a shared machine); the ratios compare settings measured in this same run.

- CPU: the plain U-Net (``unet``) at ``--size``, fp32 contiguous vs fp32 channels_last; then
  the plain U-Net at the small ``--demo-sizes`` a CPU demo can afford (ratios against 224).
- GPU (when CUDA is available): every zoo model, fp32 vs bf16 autocast (both channels_last).

Usage:
    python benchmarks/bench_train.py                  # under a minute on 2 idle CPU cores
    python benchmarks/bench_train.py --size 224 --batch 16 --steps 20   # bigger

On a CPU shared with other busy processes, OpenMP threads that spin while waiting slow every
step several-fold: run with ``OMP_WAIT_POLICY=PASSIVE`` in the environment, or ``--threads 1``.
"""

from __future__ import annotations

import argparse
import time

import torch

from advseg.allocator import keep_freed_memory
from advseg.losses import create_loss
from advseg.models import count_parameters, create_model, model_names


def images_per_second(
    name: str,
    device: torch.device,
    size: int,
    batch: int,
    steps: int,
    warmup: int,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
) -> float:
    """Images per second of full training steps for one model and setting."""
    torch.manual_seed(0)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = create_model(name).to(device, memory_format=memory_format).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    loss_fn = create_loss("dicefocal")
    image = torch.rand(batch, 3, size, size, device=device).contiguous(memory_format=memory_format)
    mask = (torch.rand(batch, 3, size, size, device=device) > 0.7).float()

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = loss_fn(model(image).float(), mask)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    # The fastest step: on a shared machine the others measure the neighbours' load.
    return batch / min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0: default")
    parser.add_argument("--demo-sizes", default="64,96,128", help="comma-separated; '' skips")
    parser.add_argument("--gpu-batch", type=int, default=16)
    parser.add_argument("--gpu-steps", type=int, default=10)
    parser.add_argument(
        "--default-malloc", action="store_true", help="leave glibc's malloc as it is"
    )
    args = parser.parse_args()
    kept = not args.default_malloc and keep_freed_memory()
    print(f"malloc: {'keeps freed memory, as the advseg command does' if kept else 'default'}")

    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    print(f"CPU: {torch.get_num_threads()} threads, plain U-Net at {args.size}, batch {args.batch}")
    common = dict(size=args.size, batch=args.batch, steps=args.steps, warmup=args.warmup)
    base = images_per_second("unet", cpu, **common)
    last = images_per_second("unet", cpu, channels_last=True, **common)
    print(f"  unet  fp32 contiguous    {base:8.2f} img/s  1.00x")
    print(f"  unet  fp32 channels_last {last:8.2f} img/s  {last / base:.2f}x")
    for size in [int(s) for s in args.demo_sizes.split(",") if s]:
        small = images_per_second("unet", cpu, size, 8, args.steps, args.warmup)
        print(f"  unet  fp32 at {size:3d} px     {small:8.2f} img/s  {small / base:.2f}x")

    if not torch.cuda.is_available():
        print("GPU: no GPU on this machine (CUDA not available); GPU rows skipped")
        return
    gpu = torch.device("cuda")
    print(f"GPU: {torch.cuda.get_device_name(gpu)}, size {args.size}, batch {args.gpu_batch}")
    gpu_common = dict(
        size=args.size, batch=args.gpu_batch, steps=args.gpu_steps, warmup=3, channels_last=True
    )
    for name in model_names():
        params = count_parameters(create_model(name)) / 1e6
        fp32 = images_per_second(name, gpu, **gpu_common)
        bf16 = images_per_second(name, gpu, dtype=torch.bfloat16, **gpu_common)
        print(
            f"  {name:16s} {params:6.2f}M  fp32 {fp32:8.1f} img/s  bf16 {bf16:8.1f} img/s  "
            f"{bf16 / fp32:.2f}x"
        )


if __name__ == "__main__":
    main()
