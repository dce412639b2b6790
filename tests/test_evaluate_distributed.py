"""Two ranks (gloo, CPU) give exactly the records of one process."""

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from advseg.evaluate import evaluate_cell
from test_evaluate import LOSSES, MemoryData, tiny_net  # tests/ is on sys.path

CELLS = [("fgsm", {}), ("pgd", {"steps": 2})]


def _run(attack: str, kwargs: dict) -> "tuple[pd.DataFrame, dict]":
    result = evaluate_cell(
        tiny_net(), MemoryData(11), range(11), attack, LOSSES, 0.03, model_name="tiny",
        arch="unet", attack_kwargs=kwargs, batch_size=3, examples=4,
    )  # fmt: skip
    return result.records, result.examples


def _worker(rank: int, world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        for attack, kwargs in CELLS:
            records, examples = _run(attack, kwargs)
            records.to_parquet(f"{out}/{attack}-{rank}.parquet")
            np.savez(f"{out}/{attack}-{rank}.npz", **examples)
    finally:
        dist.destroy_process_group()


def test_two_ranks_give_the_records_of_one_process(tmp_path):
    # fork: the ranks inherit the imported modules (torch, MONAI) instead of importing them again
    args = (2, str(tmp_path / "store"), str(tmp_path))
    mp.start_processes(_worker, args=args, nprocs=2, join=True, start_method="fork")
    for attack, kwargs in CELLS:
        expected, examples = _run(attack, kwargs)
        for rank in (0, 1):
            got = pd.read_parquet(tmp_path / f"{attack}-{rank}.parquet")
            pd.testing.assert_frame_equal(got, expected)
            saved = np.load(tmp_path / f"{attack}-{rank}.npz")
            assert sorted(saved.files) == sorted(examples)
            for key in saved.files:
                np.testing.assert_array_equal(saved[key], examples[key], err_msg=key)


def _craft(net) -> dict:
    """Transfer crafting (crossmodel.transfer.craft) of PGD with random starts on 11 slices."""
    from advseg.crossmodel.transfer import craft

    kwargs = {"steps": 2, "random_start": True, "seed": 0}
    return craft(net, MemoryData(11), range(11), "pgd", LOSSES, 0.03, attack_kwargs=kwargs,
                 batch_size=3)  # fmt: skip


def _counting_net() -> "tuple[torch.nn.Module, list[int]]":
    """``tiny_net`` counting the slices of every forward it makes."""
    net, seen = tiny_net(), []
    net.register_forward_pre_hook(lambda _, args: seen.append(len(args[0])))
    return net, seen


def _craft_worker(rank: int, world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        net, seen = _counting_net()
        images = _craft(net)
        np.savez(f"{out}/craft-{rank}.npz", seen=np.asarray(sum(seen)), **images)
    finally:
        dist.destroy_process_group()


def test_two_ranks_craft_each_transfer_image_once_and_hold_one_process_images(tmp_path):
    args = (2, str(tmp_path / "store"), str(tmp_path))
    mp.start_processes(_craft_worker, args=args, nprocs=2, join=True, start_method="fork")
    net, seen = _counting_net()
    expected = _craft(net)
    ranks = [np.load(tmp_path / f"craft-{rank}.npz") for rank in (0, 1)]
    for saved in ranks:  # every rank holds every image, exactly as one process crafts it
        assert sorted(k for k in saved.files if k != "seen") == sorted(expected)
        for loss, images in expected.items():
            assert images.shape[0] == 11
            np.testing.assert_array_equal(saved[loss], images, err_msg=loss)
    # batches 0, 2 (3 + 3 slices) on rank 0, batches 1, 3 (3 + 2) on rank 1: crafted once
    shares = [int(saved["seen"]) for saved in ranks]
    assert sum(shares) == sum(seen) and shares[0] * 5 == shares[1] * 6
