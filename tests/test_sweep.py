"""The FGSM eps sweep at the cost of one gradient: the same records as cell by cell, resumable."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from advseg.errors import UserError
from advseg.evaluate import evaluate_cell, evaluate_sweep, sweep_groups
from advseg.experiment import Cell, CellOutput, run_cells, sweep_key
from test_evaluate import LOSSES, MemoryData, tiny_net  # tests/ is on sys.path

EPS = [0.003, 0.03, 0.1]
KW = {"model_name": "tiny", "arch": "unet", "batch_size": 4, "examples": 5}


@pytest.fixture(scope="module")
def model():
    net = tiny_net()
    data = MemoryData(24, seed=3)
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-2)
    for _ in range(30):
        optimizer.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(
            net(data.images), data.masks
        ).backward()
        optimizer.step()
    return net.eval()


@pytest.mark.parametrize(
    ("attack", "options", "erase"),
    [("fgsm", {}, ()), ("fgsm", {"update": "notebook"}, ()), ("fgsm", {"norm": "l2"}, ("stomach",)),
     ("pgd", {"steps": 2}, ())],
)  # fmt: skip
def test_sweep_gives_the_records_and_examples_of_each_cell(model, attack, options, erase):
    data = MemoryData(6)
    cells = {eps: LOSSES if i % 2 == 0 else ["focal"] for i, eps in enumerate(EPS)}
    swept = evaluate_sweep(
        model, data, range(6), attack, cells, attack_kwargs=options, erase=erase, **KW
    )
    assert len(swept) == len(EPS)
    for (eps, losses), got in zip(cells.items(), swept, strict=True):
        alone = evaluate_cell(
            model, data, range(6), attack, losses, eps, attack_kwargs=options, erase=erase, **KW
        )
        pd.testing.assert_frame_equal(got.records, alone.records, check_exact=True)
        assert got.examples.keys() == alone.examples.keys()
        for key, value in alone.examples.items():
            assert (got.examples[key] == value).all(), key


def test_a_single_step_sweep_takes_one_gradient_forward_per_batch(model):
    data = MemoryData(6)
    calls = []
    handle = model.register_forward_hook(lambda m, i, o: calls.append(i[0].requires_grad))
    try:
        evaluate_sweep(model, data, range(6), "fgsm", dict.fromkeys(EPS, LOSSES), **KW)
    finally:
        handle.remove()
    # one fit check, then per batch (2 batches) one forward with input gradient and one
    # inference forward per (loss, eps)
    per_batch = [True] + [False] * len(LOSSES) * len(EPS)
    assert calls == [False] + per_batch * 2


def test_groups_and_keys_share_only_single_step_attacks():
    assert sweep_groups("fgsm", [0.1, 0.2, 0.1]) == [[0.1, 0.2]]
    assert sweep_groups("pgd", [0.1, 0.2]) == [[0.1], [0.2]]
    one = Cell("m", "fgsm", 0.1, ("bce",))
    assert sweep_key(one) == sweep_key(Cell("m", "fgsm", 0.3, ("focal",)))
    assert sweep_key(one) != sweep_key(Cell("n", "fgsm", 0.1, ("bce",)))
    assert sweep_key(Cell("m", "pgd", 0.1, ("bce",))) is None


def test_bad_sweeps_are_user_errors(model):
    data = MemoryData(4)
    with pytest.raises(UserError, match="no eps"):
        evaluate_sweep(model, data, range(4), "fgsm", {}, **KW)
    with pytest.raises(UserError, match="each loss once"):
        evaluate_sweep(model, data, range(4), "fgsm", {0.1: ["bce"], 0.2: ["bce", "bce"]}, **KW)


def _fake(cell: Cell) -> CellOutput:
    from test_experiment import _records

    return CellOutput(_records(cell))


class Counting:
    """Fake compute and sweep functions that record what they were asked for."""

    def __init__(self) -> None:
        self.single: list[str] = []
        self.swept: list[list[str]] = []

    def compute(self, cell: Cell) -> CellOutput:
        self.single.append(cell.slug)
        return _fake(cell)

    def sweep(self, cells: list[Cell]) -> list[CellOutput]:
        self.swept.append([c.slug for c in cells])
        return [_fake(c) for c in cells]


def _grid() -> list[Cell]:
    fgsm = [Cell("m", "fgsm", eps, ("bce", "focal")) for eps in (0.001, 0.003, 0.01, 0.03)]
    return [
        *fgsm[:2],
        Cell("m", "pgd", 0.01, ("bce",)),
        *fgsm[2:],
        Cell("n", "fgsm", 0.1, ("bce",)),
    ]


def test_run_cells_sweeps_a_groups_unfinished_cells_and_resumes_cell_by_cell(tmp_path):
    cells = _grid()
    fgsm = [c.slug for c in cells if c.model == "m" and c.attack == "fgsm"]
    written = []

    def interrupt(cell: Cell, skipped: bool) -> None:
        written.append(cell.slug)
        if len(written) == 2:
            raise KeyboardInterrupt  # stopped after two of the sweep's four cells were written

    first = Counting()
    with pytest.raises(KeyboardInterrupt):
        run_cells(cells, tmp_path, first.compute, interrupt, sweep=first.sweep)
    assert first.swept == [fgsm] and first.single == []
    assert sorted(p.stem for p in (tmp_path / "records").iterdir()) == sorted(fgsm[:2])

    second = Counting()
    result = run_cells(cells, tmp_path, second.compute, sweep=second.sweep)
    assert second.swept == [fgsm[2:]]  # only the sweep's unfinished cells, still together
    assert second.single == [cells[2].slug, cells[5].slug]  # pgd, and a group of one
    assert result.skipped == fgsm[:2]
    assert result.computed == [c.slug for c in cells[2:]]

    third = Counting()
    run_cells(cells, tmp_path, third.compute, sweep=third.sweep)
    assert third.swept == [] and third.single == []


@pytest.mark.parametrize(("attack", "options"), [("fgsm", {}), ("pgd", {"steps": 1})])
def test_a_sweep_scores_each_batchs_clean_prediction_once(model, monkeypatch, attack, options):
    import advseg.evaluate.cells as cells_module

    calls = []
    real = cells_module.clean_scores
    monkeypatch.setattr(
        cells_module, "clean_scores", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k)
    )
    data = MemoryData(6)
    evaluate_sweep(model, data, range(6), attack, {eps: ["bce"] for eps in EPS},
                   attack_kwargs=options, **KW)  # fmt: skip
    assert calls == [4, 2]  # 2 batches (4 and 2 slices), 3 eps each: HD95 of the clean once
