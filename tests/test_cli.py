import subprocess
import sys

import pytest

from advseg import __version__


def test_cli_version_runs_as_a_module():
    out = subprocess.run(
        [sys.executable, "-m", "advseg", "version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == __version__


@pytest.mark.parametrize("args", [["--help"], ["-h"], ["--version"], ["version"], ["trian"]])
def test_help_version_and_typos_answer_without_torch(args):
    code = (
        "import sys\nfrom advseg.cli import main\ntry:\n    main(sys.argv[1:])\n"
        "except SystemExit:\n    pass\nassert 'torch' not in sys.modules, 'torch imported'\n"
        "assert 'matplotlib' not in sys.modules and 'monai' not in sys.modules\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    if args[0] in ("--version", "version"):
        assert done.stdout.strip() == __version__


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
