"""A kill at any instant of a save loses at most the work since the last complete save.

Each case trains a tiny model for three epochs in a subprocess that ``advseg.atomic.fault_point``
ends (``os._exit``, as ``kill -9`` would) at one chosen instant of a save: before a file's rename,
between the two files of a checkpoint pair, while the previous pair is being kept. The run is then
resumed the way ``advseg run`` resumes it, and must end with the same weights as a run never
interrupted, with no temporary file left behind.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from advseg.atomic import FAULT_ENV
from advseg.models.checkpoint import checkpoint_exists, read_checkpoint
from test_train import run

TESTS = Path(__file__).parent
SRC = TESTS.parent / "src"

_SCRIPT = """
import sys
from pathlib import Path
import torch
torch.set_num_threads(1)  # as conftest.py: the same arithmetic as the uninterrupted run
sys.path.insert(0, {tests!r})
from test_fault_kills import _resume
_resume(Path(sys.argv[1]))
"""


def _train(out: Path, fault: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env[FAULT_ENV] = fault
    code = _SCRIPT.format(tests=str(TESTS))
    return subprocess.run(
        [sys.executable, "-c", code, str(out)], env=env, capture_output=True, text=True
    )


def _resume(out: Path) -> None:
    """Resume in this process, as ``advseg run`` does: from ``last`` when one was saved."""
    run(out, resume=checkpoint_exists(out / "checkpoints" / "last"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    _resume(out)
    return read_checkpoint(out / "checkpoints" / "last")[0]


# (fault, epochs certainly complete on disk after the kill)
# Each subprocess imports torch afresh (seconds to tens of seconds on a busy machine): two
# instants in the default suite, the rest with -m slow.
_slow = pytest.mark.slow
POINTS = [
    pytest.param("rename:last.safetensors@2", 1, id="before-weights-rename"),  # nothing renamed
    pytest.param("checkpoint-between:last.json@2", 1, id="between-the-pair"),  # torn pair
    pytest.param("rename:last.json@2", 1, id="before-json-rename", marks=_slow),
    pytest.param("rename:last.prev.json@1", 1, id="keeping-previous", marks=_slow),
    pytest.param("rename:last.json@3", 2, id="third-save", marks=_slow),
    pytest.param("rename:best.safetensors@1", 0, id="first-best", marks=_slow),  # nothing saved
    pytest.param("rename:log.csv@2", 2, id="before-log", marks=_slow),  # checkpoints saved
]


@pytest.mark.filterwarnings("ignore::advseg.errors.AdvsegWarning")  # "reading the previous"
@pytest.mark.parametrize(("fault", "kept"), POINTS)
def test_a_kill_during_a_save_loses_nothing_saved(tmp_path, uninterrupted, fault, kept):
    killed = _train(tmp_path, fault)
    assert killed.returncode == 137, killed.stderr  # the fault point fired
    last = tmp_path / "checkpoints" / "last"
    if kept:
        _, meta, state = read_checkpoint(last)  # the newest complete pair is readable
        assert meta.epoch >= kept and state["epoch"] == meta.epoch
    else:
        assert not checkpoint_exists(last)
    _resume(tmp_path)
    weights, meta, _ = read_checkpoint(last)
    assert meta.epoch == 3
    for key, value in uninterrupted.items():
        torch.testing.assert_close(weights[key], value, rtol=0, atol=0)
    leftovers = sorted(p.name for p in tmp_path.rglob("*") if p.name.endswith(".tmp"))
    assert leftovers == [] and not (tmp_path / "checkpoints" / "last.prev.json").exists()


@pytest.mark.slow
def test_a_kill_before_the_cache_entry_is_renamed_leaves_debris_the_next_load_removes(tmp_path):
    from advseg.data import DataConfig, PreprocessConfig, load_data, write_synthetic

    data = tmp_path / "data"
    write_synthetic(data, cases=1, scans=1, slices=2)
    code = (
        "import sys; from advseg.data import DataConfig, PreprocessConfig, load_data; "
        "load_data(DataConfig(path=sys.argv[1], preprocess=PreprocessConfig(size=16)))"
    )
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(SRC), FAULT_ENV: "rename", "ADVSEG_CACHE": str(cache)}
    killed = subprocess.run([sys.executable, "-c", code, str(data)], env=env, capture_output=True)
    assert killed.returncode == 137
    assert [p.name.endswith(".tmp") for p in cache.iterdir()] == [True]  # the partial build
    loaded = load_data(DataConfig(path=data, cache_dir=cache, preprocess=PreprocessConfig(size=16)))
    assert [p.name for p in cache.iterdir()] == [loaded.cache_path.name]
