"""Two ranks on the CPU (gloo), spawned as torchrun would start them."""

import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from advseg import distributed
from advseg.models import create_model, load_checkpoint
from advseg.train import global_dice, train
from test_train import CLASSES, Blobs, tiny_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    assert distributed.init(backend="gloo")
    try:
        assert (distributed.rank(), distributed.world_size()) == (rank, world)
        assert distributed.is_main() == (rank == 0)
        torch.manual_seed(rank)  # different inits: DistributedDataParallel must align them
        model = create_model("unet-tiny", in_channels=3, classes=2)
        result = train(
            model,
            Blobs(10),  # 5 training slices per rank
            Blobs(5, seed=1),  # 3 + 2 validation slices
            tiny_config(epochs=2),
            out_dir,
            classes=CLASSES,
        )
        params = {k: v.detach().clone() for k, v in model.state_dict().items()}
        save_file(params, f"{out_dir}/../rank{rank}.safetensors")
        history = [s.val_dice for s in result.history]
        gathered = distributed.gather_objects({"rank": rank, "history": history})
        assert [g["rank"] for g in gathered] == list(range(world))
        with open(f"{out_dir}/../rank{rank}.json", "w") as f:
            json.dump(gathered, f)
    finally:
        distributed.shutdown()


def test_two_ranks_stay_in_step_and_write_one_checkpoint(tmp_path):
    out_dir = tmp_path / "run"
    # fork: the children share the parent's imports instead of importing torch again
    args = (2, _free_port(), str(out_dir))
    mp.start_processes(_worker, args=args, nprocs=2, join=True, start_method="fork")

    rank0 = load_file(tmp_path / "rank0.safetensors")
    rank1 = load_file(tmp_path / "rank1.safetensors")
    for key, value in rank0.items():
        torch.testing.assert_close(rank1[key], value, rtol=0, atol=0)
    histories = json.loads((tmp_path / "rank0.json").read_text())
    assert histories[0]["history"] == histories[1]["history"]

    assert sorted(p.name for p in (out_dir / "checkpoints").iterdir()) == [
        "best.json",
        "best.safetensors",
        "last.json",
        "last.safetensors",
    ]
    assert len((out_dir / "log.csv").read_text().strip().splitlines()) == 1 + 2
    model, meta = load_checkpoint(out_dir / "checkpoints" / "last")
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, rank0[key], rtol=0, atol=0)

    # The Dice merged from the two ranks' shards is the Dice of the whole validation set.
    val = Blobs(5, seed=1)
    with torch.no_grad():
        logits = model(torch.stack([val[i]["image"] for i in range(5)]))
    predicted = logits.sigmoid() > 0.5
    truth = torch.stack([val[i]["mask"] for i in range(5)]) > 0.5
    counts = torch.stack(
        [
            (predicted & truth).sum((0, 2, 3)),
            (predicted & ~truth).sum((0, 2, 3)),
            (~predicted & truth).sum((0, 2, 3)),
        ]
    ).double()
    assert meta.metrics["last"]["val_dice"] == pytest.approx(global_dice(counts), abs=1e-6)


def test_single_process_answers_as_a_world_of_one():
    assert not distributed.init()  # no WORLD_SIZE in the environment
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.gather_objects("x") == ["x"]
    t = torch.ones(2)
    assert distributed.all_reduce_sum(t) is t and distributed.broadcast_object(5) == 5


@pytest.mark.parametrize(("n", "world"), [(10, 3), (2, 4), (0, 2)])
def test_shards_cover_every_row_once(n, world):
    rows = np.arange(100, 100 + n)
    shards = [distributed.shard(rows, r, world) for r in range(world)]
    assert sorted(np.concatenate(shards).tolist()) == rows.tolist()
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    with pytest.raises(ValueError):
        distributed.shard(rows, world, world)
