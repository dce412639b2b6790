import os
import subprocess
import sys

import pytest

from advseg import __version__


def test_cli_version_runs_as_a_module():
    out = subprocess.run(
        [sys.executable, "-m", "advseg", "version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == __version__


HEAVY = ("torch", "monai", "pandas", "matplotlib")


def _advseg_without(args: list[str], code: int = 0) -> subprocess.CompletedProcess:
    """``advseg ARGS`` in a fresh interpreter, checked there to exit with ``code`` having imported
    none of :data:`HEAVY` (the process itself exits 0 when both hold)."""
    script = (
        "import sys\nfrom advseg.cli import main\ntry:\n    main(sys.argv[1:])\n"
        f"except SystemExit as stop:\n    assert (stop.code or 0) == {code}, stop.code\n"
        f"heavy = set({HEAVY!r}) & set(sys.modules)\nassert not heavy, heavy\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done


@pytest.mark.parametrize(
    ("args", "code"),
    [(["--help"], 0), (["-h"], 0), (["--version"], 0), (["version"], 0), (["trian"], 2)],
)
def test_help_version_and_typos_answer_without_torch(args, code):
    done = _advseg_without(args, code)
    if args[0] in ("--version", "version"):
        assert done.stdout.strip() == __version__


def _commands_help() -> list[list[str]]:
    from advseg.cli import COMMANDS, load_command

    calls = [[name, "--help"] for name in COMMANDS]
    calls += [["data", sub, "-h"] for sub in load_command("data").commands]
    return [*calls, ["models"], ["attacks"], ["corruptions"]]


@pytest.mark.parametrize("args", _commands_help(), ids=" ".join)
def test_every_command_help_and_the_listings_answer_without_torch(args):
    """Each command's help, ``advseg models`` and ``advseg attacks`` import no torch, MONAI,
    pandas or matplotlib (the listings read :mod:`advseg.catalogue`)."""
    done = _advseg_without(args)
    assert done.stdout.strip()
    if args == ["models"]:
        from advseg.catalogue import load

        for model in load().models:
            assert model.name in done.stdout
        assert "smp:<Arch>:<encoder>" in done.stdout
    if args == ["corruptions"]:
        for name in ("motion", "ghosting", "spike", "biasfield", "noise", "blur", "gamma"):
            assert name in done.stdout


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (
            ["evaluate", "ckpt", "--out", "{out}", "--attack", "pgdd"],
            "--attack: unknown attack 'pgdd'",
        ),
        (["evaluate", "ckpt", "--out", "{out}", "--loss", "bcee"], "--loss: unknown loss 'bcee'"),
        (["evaluate", "ckpt", "--out", "{out}", "--defence", "medain:3"], "--defence: unknown"),
        (
            ["train", "--out", "{out}", "--data", "synthetic", "--model", "unett"],
            "--model: unknown",
        ),
        (["train", "--out", "{out}", "--data", "synthetic", "--adv-loss", "foca"], "--adv-loss: "),
    ],
)
def test_mistyped_names_are_refused_before_torch_loads(tmp_path, args, said):
    """A typo in a model, attack or loss name is one line, answered from the catalogue: no torch,
    no data, nothing written."""
    args = [a.format(out=tmp_path / "out") for a in args]
    done = _advseg_without(args, 2)
    assert done.stderr.startswith(f"error: {said}") and "did you mean" in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (
            ["run", "papr"],
            "papr: no such experiment file (shipped experiments: demo, paper, volumes)",
        ),
        (["run", "paper", "--out", "{out}"], "paper: data: no data set given: pass --data"),
        (["train", "--out", "{out}"], "no data set given: pass --data PATH"),
    ],
)
def test_a_missing_experiment_or_data_set_is_refused_before_torch_loads(tmp_path, args, said):
    args = [a.format(out=tmp_path / "out") for a in args]
    done = _advseg_without(args, 2)
    assert done.stderr.startswith(f"error: {said}")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_models_at_other_sizes_counts_built_models():
    from advseg.models import model_info

    done = subprocess.run(
        [sys.executable, "-m", "advseg", "models", "--classes", "4"],
        capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "(3 channels in, 4 classes)" in done.stdout
    assert f"{model_info('unet-vgg13', 3, 4).params / 1e6:.2f}M" in done.stdout


def test_subcommand_help_shows_defaults_literally():
    runner_out = subprocess.run(
        [sys.executable, "-m", "advseg", "report", "-h"], capture_output=True, text=True
    )
    assert runner_out.returncode == 0
    assert "[default: the" in runner_out.stdout  # rich markup used to swallow it


def test_run_paper_without_data_refuses_naming_data(tmp_path, capsys):
    from advseg.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["run", "paper", "--out", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--data" in err and "synthetic" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "records").exists()  # nothing computed


def test_run_data_overrides_the_yaml_path(tmp_path, capsys):
    from advseg.cli import main

    missing = tmp_path / "no-such-data"
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "paper", "--out", str(tmp_path / "run"), "--data", str(missing)])
    assert exit_info.value.code == 2
    assert str(missing) in capsys.readouterr().err  # the given path, not the YAML's null
