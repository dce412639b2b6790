"""The same options, one validator (issue 25): every seed and count of every command in the one
range of :mod:`advseg.limits`, refused in one line naming the option before any work; options
that do nothing alone refused; option values of the wrong type named."""

from __future__ import annotations

import pytest

from advseg.cli import main
from advseg.errors import UserError
from advseg.experiment import load_experiment
from advseg.limits import check_count, check_seed

BIG = str(2**64 + 1)


def _one_line(argv, capfd) -> str:
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    out, err = capfd.readouterr()
    lines = [line for line in err.splitlines() if line.strip() and "FutureWarning" not in line
             and "warnings.warn(" not in line]  # fmt: skip
    assert len(lines) == 1 and "Traceback" not in err + out, err
    return lines[0]


def _commands(tmp):
    """(name, argv before the option) of every command that takes a seed."""
    return {
        "train": ["train", "--data", str(tmp / "nodata"), "--out", str(tmp / "o")],
        "certify": ["certify", str(tmp / "ck"), "--out", str(tmp / "o")],
        "export": ["export", str(tmp / "run")],
        "data synth": ["data", "synth", "--out", str(tmp / "o")],
    }


SEED_CASES = [
    ("train", "--seed"), ("train", "--split-seed"), ("certify", "--seed"), ("export", "--seed"),
    ("export", "--train-seed"), ("data synth", "--seed"),
]  # fmt: skip


@pytest.mark.parametrize(("command", "flag"), SEED_CASES)
@pytest.mark.parametrize("value", ["-1", BIG])
def test_every_seed_option_answers_alike(tmp_path, capfd, command, flag, value):
    line = _one_line([*_commands(tmp_path)[command], flag, value], capfd)
    assert line == f"error: {flag}: {value} is not a seed in [0, 2**63 - 1]"
    assert not (tmp_path / "o").exists()


COUNT_CASES = [
    ("certify", "--n", str(2**40), "--n: 1099511627776 must lie in [1, 1,000,000]"),
    ("certify", "--n0", "0", "--n0: 0 must lie in [1, 1,000,000]"),
    ("certify", "--batch-size", "0", "--batch-size: 0 must lie in [1, 1,000,000,000]"),
    ("certify", "--max-slices", "0", "--max-slices: 0 must lie in [1, 1,000,000,000]"),
    ("certify", "--samples-per-forward", "-3", "--samples-per-forward: -3 must lie in [1,"),
    ("export", "--count", "0", "--count: 0 must lie in [1, 1,000,000,000]"),
    ("data synth", "--cases", "0", "--cases: 0 must lie in [1, 1,000,000,000]"),
    ("data synth", "--slices", str(2**40), "--slices: 1099511627776 must lie in [1,"),
    ("data synth", "--scans", "-1", "--scans: -1 must lie in [1, 1,000,000,000]"),
]


@pytest.mark.parametrize(("command", "flag", "value", "said"), COUNT_CASES)
def test_counts_out_of_range_are_one_line(tmp_path, capfd, command, flag, value, said):
    line = _one_line([*_commands(tmp_path)[command], flag, value], capfd)
    assert said in line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        (["--batch-size", "0"], "--batch-size: 0 must lie in [1,"),
        (["--examples", "-1"], "--examples: -1 must lie in [0,"),
        (["--attack-option", "random_start=maybe"], "--attack-option random_start: expected true"),
        (["--attack-option", "seed=abc"], "--attack-option seed: expected a whole-number seed"),
        (["--attack-option", "seed=-4"], "--attack-option seed: -4 is not a seed in"),
        (["--attack-option", "loss_kwargs=[1,2]"], "--attack-option loss_kwargs: expected a map"),
        (["--attack-option", "steps=2.5"], "--attack-option steps: expected a whole number"),
        (["--attack-option", "restarts=true"], "--attack-option restarts: expected a whole number"),
        (["--eps", "nan"], "--eps: eps must be a finite number >= 0, got nan"),
        (["--eps", "0.01", "--eps", "-1"], "--eps: eps must be a finite number >= 0, got -1.0"),
    ],
)
def test_evaluate_options_are_checked_before_any_checkpoint(tmp_path, capfd, extra, said):
    argv = ["evaluate", str(tmp_path / "absent"), "--out", str(tmp_path / "o"), "--attack", "pgd"]
    line = _one_line([*argv, *extra], capfd)
    assert said in line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        (["--adv-eps", "0.03"], "--adv-eps: does nothing without --adv-train or --select-by"),
        (["--adv-steps", "3"], "--adv-steps: does nothing without --adv-train (plain"),
        (["--adv-steps", "3", "--select-by", "robust"], "--adv-steps: does nothing without"),
        (["--select-steps", "3"], "--select-steps: does nothing without --adv-train or"),
    ],
)
def test_adversarial_options_alone_are_refused(tmp_path, capfd, extra, said):
    argv = ["train", "--data", str(tmp_path / "nodata"), "--out", str(tmp_path / "o")]
    assert said in _one_line([*argv, *extra], capfd)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("yaml_text", "said"),
    [
        ("seed: -1\n", "seed: -1 is not a seed in [0, 2**63 - 1]"),
        ("seeds: [0, 18446744073709551617]\n", "seeds[1]: 18446744073709551617 is not a seed"),
        ("split:\n  seed: -2\n", "split.seed: -2 is not a seed"),
        ("train:\n  seed: -3\n", "train.seed: -3 is not a seed"),
        ("name: ''\n", "name: an empty name"),
        ("name: ../../escape\n", "name: '../../escape' is not a file name"),
        ("name: ..\n", "name: '..' is not a file name"),
        ("models:\n  - name: ../up\n", "models[0].name: '../up' is not a file name"),
        ("attacks:\n  - name: pgd\n    kwargs: {random_start: maybe}\n",
         "attacks[0].kwargs.random_start: expected true or false, got 'maybe'"),
        ("attacks:\n  - name: pgd\n    kwargs: {loss_kwargs: [1, 2]}\n",
         "attacks[0].kwargs.loss_kwargs: expected a mapping"),
    ],
)  # fmt: skip
def test_yaml_seeds_names_and_kwargs_are_refused(tmp_path, yaml_text, said):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml_text)
    with pytest.raises(UserError) as err:
        load_experiment(path)
    assert str(err.value).startswith(str(path)) and said in str(err.value), err.value


def test_train_config_file_seed_is_refused(tmp_path, capfd):
    config = tmp_path / "t.yaml"
    config.write_text("seed: -1\n")
    argv = ["train", "--data", str(tmp_path / "nodata"), "--out", str(tmp_path / "o")]
    line = _one_line([*argv, "--config", str(config)], capfd)
    assert "t.yaml: train.seed: -1 is not a seed" in line


def test_the_limits_themselves():
    assert check_seed(0, "s") == 0 and check_seed(2**63 - 1, "s") == 2**63 - 1
    for bad in (-1, 2**63, True, 1.0, "3"):
        with pytest.raises(UserError, match=r"^s: "):
            check_seed(bad, "s")
    assert check_count(0, "c", 0) == 0
    with pytest.raises(UserError, match=r"c: 5 must lie in \[1, 4\]"):
        check_count(5, "c", 1, 4)


def test_a_train_config_that_is_no_mapping_is_one_line(tmp_path, capfd):
    config = tmp_path / "list.yaml"
    config.write_text("- 1\n- 2\n")
    argv = ["train", "--data", str(tmp_path / "nodata"), "--out", str(tmp_path / "o")]
    line = _one_line([*argv, "--config", str(config)], capfd)
    assert "list.yaml: expected a mapping of train settings" in line


def test_export_slices_without_an_id_is_one_line(tmp_path, capfd):
    line = _one_line(["export", str(tmp_path / "run"), "--slices", ","], capfd)
    assert "--slices ',': no slice id given" in line
