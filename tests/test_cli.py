import subprocess
import sys

from advseg import __version__


def test_cli_version_runs_as_a_module():
    out = subprocess.run(
        [sys.executable, "-m", "advseg", "version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == __version__
