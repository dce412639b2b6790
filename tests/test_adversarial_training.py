"""Adversarial training (FGSM-RS, PGD, TRADES) inside the one training loop."""

import csv
import json
import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from advseg import distributed
from advseg.config import from_dict, to_dict
from advseg.defences import AdversarialConfig, AdversarialTraining, describe, trades_divergence
from advseg.errors import UserError
from advseg.losses import create_loss
from advseg.models import create_model, load_checkpoint
from advseg.models.checkpoint import read_checkpoint
from advseg.train import TrainConfig, train
from test_distributed import _free_port
from test_train import CLASSES, Blobs, FailsAt, tiny_config

EPS = 0.03


def _batch(n: int = 4):
    items = [Blobs(n)[i] for i in range(n)]
    x = torch.stack([item["image"] for item in items])  # (B, 3, 32, 32)
    y = torch.stack([item["mask"] for item in items])  # (B, 2, 32, 32)
    return x, y


def _defence(model, method="pgd", **kw) -> AdversarialTraining:
    config = AdversarialConfig(method=method, eps=EPS, **kw)
    return AdversarialTraining(config, model, create_loss("dicefocal"), train_loss="dicefocal")


class Spy:
    """Records every forward's input, whether it could train the parameters, and the mode."""

    def __init__(self, model):
        self.calls = []
        self.model = model
        model.register_forward_pre_hook(self.hook)

    def hook(self, module, args):
        trainable = torch.is_grad_enabled() and any(
            p.requires_grad for p in self.model.parameters()
        )
        self.calls.append((args[0].detach().clone(), trainable, module.training))

    def training_inputs(self):
        return [x for x, trainable, _ in self.calls if trainable]


@pytest.mark.parametrize("method", ["fgsm-rs", "pgd", "trades"])
def test_training_batch_is_attacked_within_budget_and_parameters_get_gradients(method):
    torch.manual_seed(0)
    model = create_model("unet-tiny", in_channels=3, classes=2).train()
    spy = Spy(model)
    steps = None if method == "fgsm-rs" else 3
    defence = _defence(model, method, steps=steps, fraction=0.5)
    x, y = _batch(4)
    loss = defence.loss(model, x, y, epoch=1, step=0, steps=1)
    loss.backward()

    # The attack's forwards ran with every parameter frozen, in eval mode (the default).
    attack_calls = [c for c in spy.calls if not c[1]]
    assert len(attack_calls) >= (1 if method == "fgsm-rs" else 3)
    assert all(not training for _, _, training in attack_calls)
    # The training forward sees the first half attacked (within eps, not clean), the rest clean.
    trained = spy.training_inputs()
    adversarial = trained[-1][:2] if method == "trades" else trained[0][:2]
    delta = adversarial - x[:2]
    assert delta.abs().max() <= EPS + 1e-6 and delta.abs().max() > EPS / 2
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    if method == "trades":  # a clean forward of the whole batch, then the attacked half
        assert len(trained) == 2 and torch.equal(trained[0], x)
        assert trained[1].shape[0] == 2
    else:
        assert len(trained) == 1 and torch.equal(trained[0][2:], x[2:])
    # Parameters are unfrozen again and every one got a gradient from the training forward.
    assert model.training and all(p.requires_grad for p in model.parameters())
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_the_loop_trains_on_attacked_images(tmp_path):
    """Through train(): every training forward's images lie within eps of clean slices."""
    torch.manual_seed(0)
    model = create_model("unet-tiny", in_channels=3, classes=2)
    spy = Spy(model)
    data = Blobs(8)
    clean = torch.stack([data[i]["image"] for i in range(8)])  # (8, 3, 32, 32)
    config = tiny_config(epochs=1, adversarial=AdversarialConfig(method="pgd", eps=EPS, steps=2))
    before = [p.detach().clone() for p in model.parameters()]
    train(model, data, Blobs(4, seed=1), config, tmp_path, classes=CLASSES)
    images = torch.cat(spy.training_inputs())  # (8, 3, 32, 32): two batches of 4
    assert images.shape[0] == 8
    distance = (images[:, None] - clean[None]).abs().flatten(2).amax(2)  # (8 trained, 8 clean)
    nearest = distance.min(1).values
    assert (nearest <= EPS + 1e-6).all() and (nearest > 0).all()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


def test_trades_loss_equals_the_formula():
    torch.manual_seed(0)
    model = create_model("unet-tiny", in_channels=3, classes=2).train()
    defence = _defence(model, "trades", steps=2, beta=3.0)
    x, y = _batch(4)
    seen = {}
    perturb = defence.perturb

    def record(*args):
        seen["x_adv"] = perturb(*args)
        return seen["x_adv"]

    defence.perturb = record
    loss = defence.loss(model, x, y, epoch=1, step=0, steps=1)
    # The formula, in a few lines: L(f(x), y) + beta * mean over samples and pixels of
    # sum over classes of Bernoulli KL(p || q), p = sigmoid(f(x)), q = sigmoid(f(x')).
    p, q = model(x).sigmoid(), model(seen["x_adv"]).sigmoid()
    kl = p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))
    expected = create_loss("dicefocal")(model(x), y) + 3.0 * kl.sum(1).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_trades_divergence_against_torch_kl_div():
    torch.manual_seed(0)
    a, b = torch.randn(2, 3, 5, 5) * 3, torch.randn(2, 3, 5, 5) * 3
    # softmax: torch's kl_div(log q, p) summed over classes, mean over pixels
    reference = F.kl_div(F.log_softmax(b, 1), F.softmax(a, 1), reduction="none").sum(1)
    torch.testing.assert_close(
        trades_divergence(a, b, "softmax"), reference.flatten(1).mean(1), rtol=1e-5, atol=1e-6
    )
    # sigmoid: two-class softmax over (0, logit) per class is the Bernoulli of that class
    pairs_a = torch.stack([torch.zeros_like(a), a], 1)  # (B, 2, K, H, W)
    pairs_b = torch.stack([torch.zeros_like(b), b], 1)
    bern = F.kl_div(F.log_softmax(pairs_b, 1), F.softmax(pairs_a, 1), reduction="none").sum(1)
    torch.testing.assert_close(
        trades_divergence(a, b, "sigmoid"), bern.sum(1).flatten(1).mean(1), rtol=1e-5, atol=1e-6
    )
    assert torch.equal(trades_divergence(a, a), torch.zeros(2))
    big = torch.full((1, 1, 2, 2), 60.0)
    assert torch.isfinite(trades_divergence(big, -big)).all()  # confident models stay finite


def test_attack_in_train_mode_leaves_batchnorm_statistics_alone():
    torch.manual_seed(0)
    model = create_model("unet-tiny", in_channels=3, classes=2).train()
    buffers = [b.clone() for b in model.buffers()]
    defence = _defence(model, "pgd", steps=2, attack_mode="train")
    spy = Spy(model)
    x, y = _batch(4)
    generator = torch.Generator().manual_seed(0)
    x_adv = defence.perturb(x, y, EPS, generator)
    assert (x_adv - x).abs().max() <= EPS + 1e-6
    assert all(training and not trainable for _, trainable, training in spy.calls)
    for before, after in zip(buffers, model.buffers(), strict=True):
        assert torch.equal(before, after)
    assert all(p.requires_grad for p in model.parameters())


def test_eps_warms_up_linearly_and_fraction_rounds():
    model = create_model("unet-tiny", in_channels=3, classes=2)
    defence = _defence(model, "fgsm-rs", warmup=2)
    assert defence.eps_at(1, 0, 4) == pytest.approx(EPS / 8)
    assert defence.eps_at(1, 3, 4) == pytest.approx(EPS / 2)
    assert defence.eps_at(2, 3, 4) == pytest.approx(EPS)
    assert defence.eps_at(5, 0, 4) == pytest.approx(EPS)
    assert _defence(model, "fgsm-rs").eps_at(1, 0, 4) == EPS
    assert defence.config.step_size == pytest.approx(1.25 * EPS)
    assert _defence(model, "pgd", steps=5).config.step_size == pytest.approx(2.5 * EPS / 5)


def test_killed_mid_epoch_and_resumed_equals_an_uninterrupted_run(tmp_path):
    adversarial = AdversarialConfig(
        method="pgd", eps=EPS, steps=2, warmup=2, fraction=0.5, select_by="robust"
    )
    config = tiny_config(adversarial=adversarial)

    def run(out, train_set, resume=False, seed=0):
        torch.manual_seed(seed)
        model = create_model("unet-tiny", in_channels=3, classes=2)
        return train(model, train_set, Blobs(4, seed=1), config, out, classes=CLASSES,
                     resume=resume)  # fmt: skip

    full = run(tmp_path / "full", Blobs(8))
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", FailsAt(Blobs(8), limit=8 + 4))  # dies in epoch 2, warm-up on
    resumed = run(tmp_path / "cut", Blobs(8), resume=True, seed=123)
    assert [s.epoch for s in resumed.history] == [1, 2, 3]
    for key in ("train_loss", "val_dice", "val_robust_dice"):
        assert [getattr(s, key) for s in resumed.history] == pytest.approx(
            [getattr(s, key) for s in full.history]
        )
    w_full, _, _ = read_checkpoint(full.last_path)
    w_cut, _, _ = read_checkpoint(resumed.last_path)
    for key, value in w_full.items():
        torch.testing.assert_close(w_cut[key], value)
    assert resumed.best_epoch == full.best_epoch


def test_robust_selection_and_metadata(tmp_path):
    torch.manual_seed(0)
    model = create_model("unet-tiny", in_channels=3, classes=2)
    adversarial = AdversarialConfig(
        method="fgsm-rs", eps=EPS, select_by="robust", select_attack="pgd", select_steps=2
    )
    result = train(model, Blobs(8), Blobs(4, seed=1), tiny_config(adversarial=adversarial),
                   tmp_path, classes=CLASSES)  # fmt: skip
    robust = [s.val_robust_dice for s in result.history]
    assert all(r is not None and 0 <= r <= 1 for r in robust)
    assert result.best_dice == max(robust) and robust[result.best_epoch - 1] == max(robust)
    assert all(s.val_robust_dice <= s.val_dice + 1e-9 for s in result.history)
    _, meta = load_checkpoint(result.best_path)
    assert meta.train["adversarial"] == to_dict(adversarial)
    assert meta.metrics["train_seconds"] > 0
    with open(tmp_path / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["val_robust_dice"]) for r in rows] == pytest.approx(robust, abs=1e-5)
    # an undefended run leaves the robust column empty and is unchanged otherwise
    fresh = create_model("unet-tiny", in_channels=3, classes=2)
    plain = train(fresh, Blobs(8), Blobs(4, seed=1), tiny_config(epochs=1), tmp_path / "plain",
                  classes=CLASSES)  # fmt: skip
    assert plain.history[0].val_robust_dice is None
    # resuming with another defence is refused
    with pytest.raises(UserError, match="adversarial"):
        train(model, Blobs(8), Blobs(4, seed=1), tiny_config(epochs=4), tmp_path,
              classes=CLASSES, resume=True)  # fmt: skip


def test_config_from_yaml_dicts_and_bad_values():
    config = from_dict(
        TrainConfig, {"adversarial": {"method": "trades", "eps": 0.03, "beta": 1}}, "train"
    )
    assert config.adversarial.method == "trades" and config.adversarial.beta == 1.0
    assert from_dict(TrainConfig, to_dict(config)) == config
    assert describe(config.adversarial) == "trades eps 0.03, 10 steps of 0.0075, beta 1"
    assert describe(AdversarialConfig()) == "none"
    bad = [
        ({"method": "madry"}, "unknown adversarial training method 'madry'"),
        ({"method": "pgd", "eps": 0}, "eps: must be > 0"),
        ({"method": "pgd", "eps": 2}, "exceeds"),
        ({"method": "fgsm-rs", "steps": 3}, "fgsm-rs takes one step"),
        ({"fraction": 0}, "fraction"),
        ({"loss": "hinge"}, "unknown loss 'hinge'"),
        ({"select_by": "best"}, "select_by"),
        ({"epsilon": 1}, "train.adversarial.epsilon: unknown key"),
    ]
    for values, message in bad:
        with pytest.raises(UserError, match=message):
            from_dict(TrainConfig, {"adversarial": values}, "train")


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    assert distributed.init(backend="gloo")
    try:
        torch.manual_seed(rank)
        model = create_model("unet-tiny", in_channels=3, classes=2)
        adversarial = AdversarialConfig(method="trades", eps=EPS, steps=2, select_by="robust",
                                        select_steps=1)  # fmt: skip
        result = train(model, Blobs(8), Blobs(4, seed=1), tiny_config(epochs=2,
                       adversarial=adversarial), out_dir, classes=CLASSES)  # fmt: skip
        params = {k: v.detach().clone() for k, v in model.state_dict().items()}
        save_file(params, f"{out_dir}/../rank{rank}.safetensors")
        with open(f"{out_dir}/../rank{rank}.json", "w") as f:
            json.dump([s.val_robust_dice for s in result.history], f)
    finally:
        distributed.shutdown()


def test_adversarial_training_under_ddp_keeps_ranks_in_step(tmp_path):
    out_dir = tmp_path / "run"
    args = (2, _free_port(), str(out_dir))
    mp.start_processes(_ddp_worker, args=args, nprocs=2, join=True, start_method="fork")
    rank0 = load_file(tmp_path / "rank0.safetensors")
    rank1 = load_file(tmp_path / "rank1.safetensors")
    for key, value in rank0.items():
        torch.testing.assert_close(rank1[key], value, rtol=0, atol=0)
    robust = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert robust[0] == robust[1] and None not in robust[0]
    _, meta = load_checkpoint(out_dir / "checkpoints" / "last")
    assert meta.train["adversarial"]["method"] == "trades"


def test_train_command_with_adversarial_options(tmp_path, capsys):
    from advseg.cli import main
    from advseg.data import UWMGI_CLASSES, write_synthetic

    data = tmp_path / "data"
    write_synthetic(data, cases=3, scans=1, slices=4)
    out = tmp_path / "run"
    yaml_file = tmp_path / "train.yaml"
    yaml_file.write_text("adversarial:\n  beta: 2.0\n  warmup: 1\n")
    args = ["train", "--data", str(data), "--out", str(out), "--model", "unet-tiny"]
    args += ["--size", "32", "--epochs", "1", "--batch-size", "4", "--test-fraction", "0.34"]
    args += ["--val-fraction", "0.5", "--config", str(yaml_file), "--adv-train", "trades"]
    args += ["--adv-eps", "0.02", "--adv-steps", "2", "--select-by", "robust"]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 0
    printed = capsys.readouterr().out
    assert "best robust validation Dice" in printed and "trades eps 0.02" in printed
    _, meta = load_checkpoint(out / "checkpoints" / "best", classes=list(UWMGI_CLASSES))
    saved = meta.train["adversarial"]
    assert (saved["method"], saved["eps"], saved["steps"], saved["beta"]) == ("trades", 0.02, 2, 2)
    assert saved["select_by"] == "robust" and saved["warmup"] == 1

    with pytest.raises(SystemExit) as exit_:
        main([*args[:-6], "--adv-train", "madry", "--out", str(tmp_path / "bad")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --adv-train: unknown adversarial training method")
    assert "fgsm-rs" in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists()


def test_a_grid_holds_defended_and_undefended_models_side_by_side(tmp_path):
    from advseg.augment import AugmentConfig
    from advseg.data import write_synthetic
    from advseg.experiment import load_experiment, run_experiment

    data = tmp_path / "data"
    write_synthetic(data, cases=3, scans=1, slices=8, seed=0)
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        f"""
data: {{path: {data}, cache_dir: {tmp_path / "cache"}, preprocess: {{size: 32}}}}
split: {{test_fraction: 0.34, val_fraction: 0.5}}
train: {{epochs: 1, batch_size: 4, device: cpu, augment: {{enabled: false}}}}
models:
  - {{arch: unet-tiny, name: plain}}
  - {{arch: unet-tiny, name: pgd, adversarial: {{method: pgd, eps: 0.03, steps: 2}}}}
attacks:
  - {{name: fgsm, losses: [bce], eps: [0.03]}}
evaluation: {{batch_size: 4, examples: 0}}
"""
    )
    config = load_experiment(grid)
    assert config.models[0].adversarial is None and config.models[1].adversarial.method == "pgd"
    assert config.train.augment == AugmentConfig(enabled=False)
    result = run_experiment(config, tmp_path / "run")
    assert sorted(result.trained) == ["pgd", "plain"]
    _, meta = load_checkpoint(tmp_path / "run" / "models" / "pgd" / "checkpoints" / "best")
    assert meta.train["adversarial"]["method"] == "pgd" and meta.train["adversarial"]["steps"] == 2
    _, meta = load_checkpoint(tmp_path / "run" / "models" / "plain" / "checkpoints" / "best")
    assert meta.train["adversarial"]["method"] == "none"
    # The report shows how each model was trained, what it cost and how it held.
    table = (tmp_path / "run" / "report" / "training.csv").read_text()
    assert "pgd eps 0.03 (7.65/255), 2 steps of 0.0375" in table and "time_ratio" in table
    assert "dsc_worst" in table
    assert "Training and adversarial training" in result.report.html.read_text()

    bad = grid.read_text().replace(
        "name: plain}", "name: plain, checkpoint: x, adversarial: {method: pgd}}"
    )
    grid.write_text(bad)
    with pytest.raises(UserError, match=r"models\[0\].adversarial: only a model trained here"):
        load_experiment(grid)
