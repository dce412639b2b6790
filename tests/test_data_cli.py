import pytest

from advseg.cli import main


def _run(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


def test_synth_then_info(tmp_path, capsys):
    out = tmp_path / "phantom"
    code, text, _ = _run(
        ["data", "synth", "--out", str(out), "--cases", "2", "--scans", "1", "--slices", "5"],
        capsys,
    )
    assert code == 0 and "wrote 10 slices" in text and (out / "train.csv").is_file()
    code, text, _ = _run(["data", "info", str(out), "--exclude", "host"], capsys)
    assert code == 0
    for expected in (
        "│ slices        │ 10",
        "│ cases         │ 2",
        "266x266: 5, 360x310: 5",
        "large_bowel, small_bowel, stomach",
        "0 of 12 listed",
    ):
        assert expected in text, expected


def test_synth_refuses_a_non_empty_directory(tmp_path, capsys):
    (tmp_path / "x").write_text("keep me")
    code, _, err = _run(["data", "synth", "--out", str(tmp_path), "--slices", "2"], capsys)
    assert code == 2 and "exists and is not empty" in err
    assert (tmp_path / "x").read_text() == "keep me"
