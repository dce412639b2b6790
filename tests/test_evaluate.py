import io

import numpy as np
import pandas as pd
import pytest
import torch
from rich.console import Console
from torch import nn
from torch.utils.data import Dataset

from advseg.attacks import create_attack
from advseg.attacks.sea import slice_dice
from advseg.errors import UserError
from advseg.evaluate import cell_progress, draw_seed, evaluate_cell
from advseg.metrics import confusion_counts, hd95
from advseg.runs.records import RECORD_COLUMNS, check_records
from advseg.stats.summary import summarize

CLASSES = ["large_bowel", "small_bowel", "stomach"]
LOSSES = ["bce", "focal", "dicefocal"]


class MemoryData:
    """Slices in memory with the ``SliceData`` interface evaluate_cell uses."""

    def __init__(self, n: int = 10, size: int = 16, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.images = 0.2 * torch.rand(n, 3, size, size, generator=g)
        self.masks = torch.zeros(n, 3, size, size)
        for i in range(n):
            for k in range(3):
                if (i + k) % 3:  # some classes empty, slice 0 ... has masks, a few are blank
                    r, c = torch.randint(0, size - 5, (2,), generator=g).tolist()
                    self.images[i, k, r : r + 5, c : c + 5] += 0.6
                    self.masks[i, k, r : r + 5, c : c + 5] = 1
        self.masks[n - 1] = 0  # one slice with no mask at all
        self.index = pd.DataFrame(
            {
                "id": [f"case{1 + i // 4}_day0_slice_{i % 4 + 1:04d}" for i in range(n)],
                "case": [1 + i // 4 for i in range(n)],
                "scan": [f"case{1 + i // 4}_day0" for i in range(n)],
                "slice": [i % 4 + 1 for i in range(n)],
            }
        )
        self.classes = CLASSES
        # anisotropic model pixels: 0.5 mm down, 2 mm across (as SliceData.geometry gives them)
        self.geometry = pd.DataFrame({"mm_h": np.full(n, 0.5), "mm_w": np.full(n, 2.0)})

    def dataset(self, rows):
        return _Items(self, list(rows))


class _Items(Dataset):
    def __init__(self, data, rows):
        self.data, self.rows = data, rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        r = self.rows[i]
        return {"image": self.data.images[r], "mask": self.data.masks[r], "row": r}


def tiny_net(in_channels: int = 3, classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, classes, 3, padding=1)
    )


@pytest.fixture(scope="module")
def model():
    net = tiny_net()
    data = MemoryData(32, seed=9)
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-2)
    for _ in range(40):
        optimizer.zero_grad()
        nn.functional.binary_cross_entropy_with_logits(net(data.images), data.masks).backward()
        optimizer.step()
    net.zero_grad(set_to_none=True)
    return net


def _cell(model, data, rows, attack="fgsm", **kw):
    kw = {"model_name": "tiny", "arch": "unet", "batch_size": 4} | kw
    return evaluate_cell(model, data, rows, attack, LOSSES, 0.05, **kw)


def test_records_are_complete_and_match_direct_computation(model):
    data = MemoryData()
    rows = [3, 0, 5, 9, 7, 1, 2]
    result = _cell(model, data, rows)
    records = result.records
    assert list(records.columns) == list(RECORD_COLUMNS)
    assert len(records) == len(rows) * 3 * len(LOSSES)
    hd95_columns = ["hd95_clean", "hd95_adv", "hd95_mm_clean", "hd95_mm_adv"]
    assert records["min_eps"].isna().all()  # a fixed-budget attack measures no minimal norm
    nsd_columns = ["nsd_clean", "nsd_adv", "nsd_mm"]  # volumes only
    assert (
        not records.drop(columns=[*hd95_columns, *nsd_columns, "min_eps", "min_eps_upper"])
        .isna()
        .to_numpy()
        .any()
    )
    # the mm distance is defined exactly where the pixel one is, and lies between 0.5x and 2x it
    assert records["hd95_mm_adv"].isna().equals(records["hd95_adv"].isna())
    defined = records.dropna(subset=["hd95_adv"])
    assert (defined["hd95_mm_adv"] >= 0.5 * defined["hd95_adv"] - 1e-9).all()
    assert (defined["hd95_mm_adv"] <= 2.0 * defined["hd95_adv"] + 1e-9).all()
    assert (defined["hd95_mm_adv"] != defined["hd95_adv"]).any()
    first = records[records["loss"] == "bce"]
    assert first["slice_id"].iloc[::3].tolist() == data.index["id"].iloc[rows].tolist()
    assert first["class"].tolist()[:3] == CLASSES
    assert set(records["params"]) == {sum(p.numel() for p in model.parameters())}
    x, y = data.images[rows], data.masks[rows]
    for loss in LOSSES:
        x_adv = create_attack("fgsm", model, loss, 0.05)(x, y)
        with torch.no_grad():
            tp, fp, fn = confusion_counts(model(x_adv) > 0, y > 0.5)
            hd_adv = hd95(model(x_adv) > 0, y > 0.5)
            hd_mm = hd95(model(x_adv) > 0, y > 0.5, np.tile([0.5, 2.0], (len(rows), 1)))
        got = records[records["loss"] == loss]
        np.testing.assert_allclose(got["hd95_mm_adv"], hd_mm.flatten().numpy())
        assert got["tp_adv"].tolist() == tp.flatten().tolist()
        assert got["fp_adv"].tolist() == fp.flatten().tolist()
        assert got["fn_adv"].tolist() == fn.flatten().tolist()
        np.testing.assert_allclose(got["hd95_adv"], hd_adv.flatten().numpy())
        assert got["linf"].max() == pytest.approx(0.05, abs=1e-6)
    assert (records["gt_pixels"] == records["tp_clean"] + records["fn_clean"]).all()
    blank = records[records["slice_id"] == data.index["id"][9]]
    assert (blank["gt_pixels"] == 0).all()
    assert (records["dice_adv"] <= records["dice_clean"] + 1e-9).mean() > 0.8


def test_losses_share_one_clean_forward_and_parameters_get_no_gradient(model):
    data = MemoryData()
    calls = []
    handle = model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    model.train()
    try:
        _cell(model, data, range(10))
    finally:
        handle.remove()
    # one slice checks the model fits the data; then per batch of (4, 4, 2) slices one clean
    # forward with input gradient and one forward per loss of its adversarial images
    assert calls == [1, 4, 4, 4, 4, 4, 4, 4, 4, 2, 2, 2, 2]
    assert model.training and all(p.requires_grad and p.grad is None for p in model.parameters())
    model.eval()


def test_iterative_attack_cell_is_deterministic_and_raises_the_error(model):
    data = MemoryData()
    kw = {"attack_kwargs": {"steps": 3}}
    first = _cell(model, data, range(10), "pgd", **kw).records
    again = _cell(model, data, range(10), "pgd", **kw).records
    pd.testing.assert_frame_equal(first, again)
    table = summarize(first, "per-class")
    for loss in LOSSES:
        assert table[f"AS pgd {loss} eps=0.05"].iloc[0] > 0


def test_a_loss_gives_the_same_records_whatever_losses_share_its_cell(model):
    data = MemoryData()
    kw = {"attack_kwargs": {"steps": 2}}
    alone = evaluate_cell(model, data, range(8), "pgd", ["bce"], 0.05, model_name="tiny",
                          arch="unet", batch_size=4, **kw).records  # fmt: skip
    shared = evaluate_cell(model, data, range(8), "pgd", ["focal", "bce"], 0.05, model_name="tiny",
                           arch="unet", batch_size=4, **kw).records  # fmt: skip
    shared = shared[shared["loss"] == "bce"].reset_index(drop=True)
    pd.testing.assert_frame_equal(alone, shared)  # random starts drawn per (batch, loss)


def test_only_batches_give_those_batches_records_of_the_whole_pass(model):
    data = MemoryData()
    kw = {"attack_kwargs": {"steps": 2}}
    whole = _cell(model, data, range(10), "pgd", **kw)
    part = _cell(model, data, range(10), "pgd", only_batches=[2, 0], examples=[9, 1], **kw)
    ids = set(data.index["id"].iloc[[0, 1, 2, 3, 8, 9]])  # batches 0 and 2 (of 4, 4, 2 slices)
    expected = whole.records[whole.records["slice_id"].isin(ids)].reset_index(drop=True)
    pd.testing.assert_frame_equal(part.records, expected)  # the same random starts
    assert list(part.examples["slice_ids"]) == list(data.index["id"].iloc[[1, 9]])
    with pytest.raises(ValueError, match="only_batches"):
        _cell(model, data, range(10), "pgd", only_batches=[3], **kw)


def test_examples_are_seeded_and_spread_over_cases(model):
    data = MemoryData()  # cases 1 (rows 0-3), 2 (rows 4-7), 3 (rows 8-9)
    rows = [4, 5, 6, 7, 8, 0]
    result = _cell(model, data, rows, examples=3)
    ex = result.examples
    ids = ex["slice_ids"].tolist()
    assert {int(i.split("_")[0][4:]) for i in ids} == {1, 2, 3}  # one slice of each case
    picked = [rows[[data.index["id"].iat[r] for r in rows].index(i)] for i in ids]
    assert picked == sorted(picked, key=rows.index)  # in the order of the rows evaluated
    assert _cell(model, data, rows, examples=3).examples["slice_ids"].tolist() == ids  # seeded
    assert ex["losses"].tolist() == LOSSES
    assert ex["image"].shape == (3, 3, 16, 16) and ex["mask"].dtype == np.uint8
    assert ex["x_adv"].shape == (3, 3, 3, 16, 16) and ex["pred_adv"].shape == (3, 3, 3, 16, 16)
    fgsm = create_attack("fgsm", model, "focal", 0.05)
    expected = fgsm(data.images[picked], data.masks[picked])
    np.testing.assert_allclose(ex["x_adv"][1], expected.numpy(), atol=1e-6)
    everything = _cell(model, data, rows, examples=10).examples["slice_ids"].tolist()
    assert everything == data.index["id"].iloc[rows].tolist()  # all of them, in order
    assert _cell(model, data, [0, 1]).examples == {}


def test_summary_of_a_cell_has_table_two_layout(model):
    records = _cell(model, MemoryData(), range(10)).records
    for protocol in ("paper", "per-class", "global"):
        table = summarize(records, protocol)
        assert len(table) == 1 and not table.isna().to_numpy().any()
        assert 0 < table["DSC clean"].iloc[0] <= 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rows": []}, "no slices"),
        ({"attack": "pdg"}, "unknown attack 'pdg'.*valid"),
        ({"losses": ["bce", "bec"]}, "unknown loss 'bec'.*valid"),
        ({"eps": -1.0}, "eps must be"),
        ({"eps": 3.0}, "exceeds"),
        ({"model": tiny_net(classes=2)}, "predicts 2 channels.*data has 3 classes"),
        ({"model": tiny_net(in_channels=1)}, "does not fit the data: images have 3 channels"),
        ({"losses": []}, "no attack loss"),
        ({"losses": ["ce"]}, "'ce' is for softmax models"),
    ],
)
def test_bad_input_is_a_user_error(model, change, message):
    args = {"model": model, "data": MemoryData(4), "rows": [0, 1], "attack": "fgsm"}
    args |= {"losses": ["bce"], "eps": 0.01} | change
    with pytest.raises(UserError, match=message):
        evaluate_cell(**args, model_name="tiny", arch="unet")


def test_targeted_cell_makes_an_organ_vanish(model):
    data = MemoryData()
    records = evaluate_cell(
        model, data, range(10), "pgd", ["bce"], 0.2, model_name="tiny", arch="unet",
        attack_kwargs={"steps": 5}, erase=["stomach"],
    ).records  # fmt: skip
    assert set(records["attack"]) == {"pgd:erase=stomach"}
    stomach = records[records["class"] == "stomach"]
    predicted_clean = (stomach["tp_clean"] + stomach["fp_clean"]).sum()
    predicted_adv = (stomach["tp_adv"] + stomach["fp_adv"]).sum()
    assert predicted_adv < 0.5 * predicted_clean
    with pytest.raises(UserError, match="unknown class 'liver'; valid: large_bowel"):
        evaluate_cell(model, data, [0], "fgsm", ["bce"], 0.1, model_name="t", arch="u",
                      erase=["liver"])  # fmt: skip
    with pytest.raises(UserError, match="needs the classes to erase"):
        evaluate_cell(model, data, [0], "fgsm", ["bce"], 0.1, model_name="t", arch="u",
                      attack_kwargs={"targeted": True})  # fmt: skip


def test_progress_reports_each_batch_and_a_quiet_console_shows_nothing(model):
    data = MemoryData()
    seen = []
    _cell(model, data, range(10), on_batch=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 3), (2, 3), (3, 3)]
    shown = Console(file=io.StringIO(), force_terminal=True, width=100)
    with cell_progress(shown, "tiny, fgsm") as on_batch:
        _cell(model, data, range(10), on_batch=on_batch)
    assert "tiny, fgsm, batches" in shown.file.getvalue() and "3/3" in shown.file.getvalue()
    quiet = Console(file=io.StringIO(), quiet=True)
    with cell_progress(quiet, "tiny, fgsm") as on_batch:
        _cell(model, data, range(10), on_batch=on_batch)
    assert quiet.file.getvalue() == ""


def test_sea_cell_has_one_worst_case_loss_and_names_each_slices_winner(model):
    data = MemoryData()
    rows = [0, 1, 2, 3, 4, 5]
    result = _cell(model, data, rows, "sea", attack_kwargs={"steps": 4})
    records = result.records
    assert list(records.columns) == list(RECORD_COLUMNS)
    assert set(records["loss"]) == {"worst-case"}  # not once per loss of the sweep
    assert len(records) == len(rows) * 3
    winners = records.groupby("slice_id", sort=False)["member"].agg(set)
    assert all(len(w) == 1 for w in winners)  # one winner per slice, on each class's row
    members = {"masked-bce", "js", "masked-spherical", "balanced-bce", "none"}
    assert set(records["member"]) <= members and set(records["member"]) != {"none"}
    # the records' adversarial Dice is the attack's own choice, batch by batch
    x, y = data.images[rows[:4]], data.masks[rows[:4]]
    sea = create_attack("sea", model, eps=0.05, steps=4)
    x_adv = sea(x, y, generator=torch.Generator().manual_seed(draw_seed(sea, 0)))
    with torch.no_grad():
        best = slice_dice(model(x_adv), y, "sigmoid").numpy()
    got = records.groupby("slice_id", sort=False)["dice_adv"].mean().to_numpy()[:4]
    np.testing.assert_allclose(best, got)
    assert records["member"].tolist()[: 4 * 3 : 3] == sea.winners
    # the records name which SEA ran: preset, steps per member, members
    members = "masked-bce+segpgd-bce+js+masked-spherical"
    assert set(records["attack_setting"]) == {f"preset=reference steps=4 members={members}"}
    fast = _cell(model, data, [0], "sea", attack_kwargs={"preset": "fast"}).records
    assert set(fast["attack_setting"]) == {f"preset=fast steps=25 members={members}"}
    # images crafted elsewhere by sea (a transfer cell) keep the setting; other labels none
    given = lambda x, y, at: [x] * len(LOSSES)  # noqa: E731
    moved = _cell(model, data, [0], "sea", attack_kwargs={"preset": "fast"}, crafted=given)
    assert set(moved.records["attack_setting"]) == set(fast["attack_setting"])
    other = _cell(model, data, [0], "random-sign", crafted=given)
    assert set(other.records["attack_setting"]) == {""}


def test_other_attacks_have_an_empty_member_and_old_records_read(model):
    records = _cell(model, MemoryData(), [0, 1], "fgsm").records
    assert set(records["member"]) == {""} and set(records["loss"]) == set(LOSSES)
    assert set(records["attack_setting"]) == {""}
    old = pd.DataFrame(records).drop(columns=["member", "attack_setting"])  # written before
    assert (check_records(old)["member"] == "").all()
    assert (check_records(old)["attack_setting"] == "").all()
