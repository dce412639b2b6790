"""Convergence traces: per step the batch's mean loss and mean Dice, the last one the result's."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from advseg.attacks import ATTACKS, attack_options, create_attack
from advseg.errors import UserError
from advseg.losses import create_loss
from advseg.metrics import dice_score
from advseg.runs.traces import TRACE_COLUMNS, cell_trace, read_traces, write_trace
from tiny_models import blobs, tiny_net  # tests/ is on sys.path


def _final(model, loss, x_adv, y):
    with torch.no_grad():
        logits = model(x_adv)
    return create_loss(loss, reduction="none")(logits, y).mean().item(), float(
        dice_score(logits > 0, y > 0.5).mean()
    )


TRACED = ["fgsm", "bim", "pgd", "mifgsm", "segpgd", "cospgd", "dag", "asma", "alma-prox",
          "pdpgd"]  # per-sample steps  # fmt: skip


def test_the_traced_attacks_are_registered():
    assert set(TRACED) <= set(ATTACKS.names())


@pytest.mark.parametrize("name", TRACED)
def test_trace_has_one_entry_per_step_and_ends_at_the_result(name):
    model = tiny_net().eval()
    x, y = blobs(3, size=8)
    steps = 4 if "steps" in attack_options(name) else 1
    kw = {"steps": steps} if "steps" in attack_options(name) else {}
    attack = create_attack(name, model, "bce", 0.05, record_trace=True, **kw)
    x_adv = attack(x, y)
    assert len(attack.trace) == steps
    loss, dice = attack.trace[-1]
    assert loss == pytest.approx(_final(model, "bce", x_adv, y)[0], rel=1e-5)
    assert dice == pytest.approx(_final(model, "bce", x_adv, y)[1], rel=1e-9)
    assert all(0 <= d <= 1 for _, d in attack.trace)
    again = attack(x, y)  # a new call starts a new trace
    assert torch.equal(again, x_adv) and len(attack.trace) == steps


def test_no_trace_unless_asked_and_it_costs_no_model_call_but_one():
    model = tiny_net().eval()
    x, y = blobs(2, size=8)
    plain = create_attack("pgd", model, "bce", 0.05, steps=3)
    traced = create_attack("pgd", model, "bce", 0.05, steps=3, record_trace=True)
    calls = []
    handle = model.register_forward_hook(lambda m, i, o: calls.append(1))
    try:
        first = plain(x, y)
        plain_calls = len(calls)
        second = traced(x, y)
    finally:
        handle.remove()
    assert plain.trace == [] and torch.equal(first, second)
    assert len(calls) - plain_calls == plain_calls + 1  # the steps' forwards + the result's


def test_softmax_trace_takes_class_indices():
    model = tiny_net().eval()
    x, y = blobs(2, size=8)
    attack = create_attack("dag", model, "ce", 0.05, steps=3, record_trace=True)
    attack(x, y.argmax(1))
    assert len(attack.trace) == 3


# ------------------------------------------------------------ traces kept by the evaluation


def test_a_cell_keeps_its_trace_and_its_last_step_is_the_records_dice():
    from advseg.evaluate import evaluate_cell, evaluate_sweep
    from test_evaluate import MemoryData

    model = tiny_net().eval()
    data = MemoryData(6)
    kw = {"model_name": "tiny", "arch": "unet", "batch_size": 4, "attack_kwargs": {"steps": 3}}
    (result,) = evaluate_sweep(
        model, data, range(6), "pgd", {0.05: ["bce", "focal"]}, trace=True, **kw
    )
    trace = result.trace
    assert list(trace.columns) == list(TRACE_COLUMNS)
    assert len(trace) == 2 * 3 and trace["step"].tolist() == [1, 2, 3] * 2
    assert set(trace["attack"]) == {"pgd"} and set(trace["eps"]) == {0.05}
    for loss, frame in result.records.groupby("loss"):
        last = trace[(trace["loss"] == loss) & (trace["step"] == 3)].iloc[0]
        assert last["mean_dice"] == pytest.approx(frame["dice_adv"].mean(), abs=1e-9)
    plain = evaluate_cell(model, data, range(6), "pgd", ["bce", "focal"], 0.05, **kw)
    pd.testing.assert_frame_equal(plain.records, result.records)  # tracing changes no record
    assert plain.trace is None
    (fgsm,) = evaluate_sweep(model, data, range(6), "fgsm", {0.05: ["bce"]}, trace=True,
                             model_name="tiny", arch="unet")  # fmt: skip
    assert fgsm.trace is None  # a single step: nothing to trace


def test_run_cells_writes_a_cells_trace_beside_its_records(tmp_path):
    from advseg.experiment import Cell, CellOutput, run_cells
    from test_experiment import _records

    cell = Cell("m", "pgd", 0.01, ("bce",))
    trace = pd.DataFrame(
        [("m", "pgd", 0.01, "bce", s, 0.5 / s, 0.8 - 0.1 * s) for s in (1, 2, 3)],
        columns=list(TRACE_COLUMNS),
    )
    run_cells([cell], tmp_path, lambda c: CellOutput(_records(c), None, trace))
    written = read_traces(tmp_path)
    pd.testing.assert_frame_equal(written, trace)
    assert (tmp_path / "traces" / f"{cell.slug}.csv").exists()


def test_the_report_asks_whether_the_attacks_converged_when_traces_exist(tmp_path):
    from advseg.report import write_report
    from test_report import _records as report_records
    from test_report import _write_run

    _write_run(tmp_path, report_records(), examples=False)
    assert "Did the attacks converge?" not in write_report(tmp_path).markdown.read_text()
    rows = [("vgg", attack, 0.009, "bce", s, 1.0 / s, 0.9 - d * s)
            for attack, d in (("pgd", 0.05), ("apgd", 0.08)) for s in range(1, 11)]  # fmt: skip
    write_trace(pd.DataFrame(rows, columns=list(TRACE_COLUMNS)), tmp_path / "traces" / "x.csv")
    report = write_report(tmp_path)
    markdown = report.markdown.read_text()
    assert "Did the attacks converge?" in markdown
    assert "convergence_vgg_eps0.009.png" in {p.name for p in report.files}
    table = pd.read_csv(tmp_path / "report" / "convergence.csv")
    assert table.set_index("attack")["last_fifth_drop"].round(6).to_dict() == {
        "pgd": 0.1, "apgd": 0.16
    }  # fmt: skip


def test_a_broken_trace_file_is_one_line_naming_it(tmp_path):
    (tmp_path / "traces").mkdir()
    (tmp_path / "traces" / "bad.csv").write_text("model,attack\nm,pgd\n")
    with pytest.raises(UserError, match=r"bad\.csv: trace file without column 'eps'"):
        read_traces(tmp_path)


def test_cell_trace_weighs_batches_by_their_slices():
    batches = [(3, [[(1.0, 0.5), (2.0, 0.4)]]), (1, [[(5.0, 0.1), (6.0, 0.0)]])]
    trace = cell_trace(batches, ["bce"], model="m", attack="pgd", eps=0.1)
    assert trace["mean_loss"].tolist() == [2.0, 3.0]
    assert trace["mean_dice"].tolist() == pytest.approx([0.4, 0.3])


def test_a_softmax_trace_leaves_the_background_out_as_the_records_do():
    from advseg.evaluate import evaluate_sweep
    from advseg.labels import softmax_target
    from test_evaluate import MemoryData

    data = MemoryData(6)
    data.masks = softmax_target(data.masks)[:, 1:]  # no overlap: the records' masks are its target
    model = tiny_net(classes=4).eval()  # background + 3 classes
    kw = {"model_name": "soft", "arch": "unet", "batch_size": 6}
    kw["attack_kwargs"] = {"steps": 2, "activation": "softmax"}
    (result,) = evaluate_sweep(model, data, range(6), "pgd", {0.05: ["ce"]}, trace=True, **kw)
    last = result.trace[result.trace["step"] == 2].iloc[0]
    assert last["mean_dice"] == pytest.approx(result.records["dice_adv"].mean(), abs=1e-9)
