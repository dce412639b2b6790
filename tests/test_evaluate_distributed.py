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
