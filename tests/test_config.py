from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from advseg.config import from_dict, load_yaml, save_yaml, to_dict
from advseg.errors import UserError


@dataclass
class Inner:
    size: int = 224
    mode: Literal["max", "percentile"] = "max"


@dataclass
class Outer:
    name: str = "x"
    eps: list[float] = field(default_factory=lambda: [0.009])
    inner: Inner = field(default_factory=Inner)
    out: Path | None = None


def test_round_trip_through_yaml(tmp_path):
    cfg = Outer(
        name="run", eps=[0.001, 0.01], inner=Inner(size=64, mode="percentile"), out=Path("r")
    )
    save_yaml(cfg, tmp_path / "c.yaml")
    assert from_dict(Outer, load_yaml(tmp_path / "c.yaml")) == cfg
    assert to_dict(cfg)["out"] == "r"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"inner": {"sise": 3}}, r"inner.sise: unknown key; valid keys: mode, size"),
        ({"inner": {"size": "big"}}, r"inner.size: expected an integer, got 'big'"),
        ({"inner": {"mode": "min"}}, r"inner.mode: 'min' is not one of 'max', 'percentile'"),
        ({"eps": [0.1, "a"]}, r"eps\[1\]: expected a number, got 'a'"),
        ({"eps": 0.1}, r"eps: expected a list"),
    ],
)
def test_bad_keys_and_types_name_the_dotted_key(data, message):
    with pytest.raises(UserError, match=message):
        from_dict(Outer, data)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("a: 1\nb: [1, 2\n")
    with pytest.raises(UserError, match=r"bad.yaml: line \d+"):
        load_yaml(path)
    with pytest.raises(UserError, match=r"missing.yaml: cannot read"):
        load_yaml(tmp_path / "missing.yaml")
