"""Convergence traces: per step the batch's mean loss and mean Dice, the last one the result's."""

from __future__ import annotations

import pytest
import torch

from advseg.attacks import ATTACKS, attack_options, create_attack
from advseg.losses import create_loss
from advseg.metrics import dice_score
from test_attacks import blobs, tiny_net  # tests/ is on sys.path


def _final(model, loss, x_adv, y):
    with torch.no_grad():
        logits = model(x_adv)
    return create_loss(loss, reduction="none")(logits, y).mean().item(), float(
        dice_score(logits > 0, y > 0.5).mean()
    )


TRACED = ["fgsm", "bim", "pgd", "mifgsm", "segpgd", "cospgd", "dag", "asma"]  # per-sample steps


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
