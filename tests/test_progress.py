from advseg.progress import IntervalLines, clock_text, eta_seconds


def test_lines_come_at_intervals_with_an_eta_and_always_at_the_end():
    now = [0.0]
    lines: list[str] = []
    progress = IntervalLines(lines.append, "epoch 1/3 train", 10, interval=30, clock=lambda: now[0])
    for step in range(1, 11):
        now[0] = 10.0 * step
        progress.update(step, extra="loss 0.5")
    # 10 s a step: lines at 10 s (first), 40 s, 70 s, 100 s (the last step, no ETA)
    assert [line.split(":")[1].split()[0] for line in lines] == ["1/10", "4/10", "7/10", "10/10"]
    assert lines[0] == "epoch 1/3 train: 1/10 batches (10%), 0:00:10 elapsed, ETA 0:01:30  loss 0.5"
    assert "ETA" not in lines[-1] and "(100%)" in lines[-1]


def test_clock_and_eta():
    assert clock_text(3725.2) == "1:02:05" and clock_text(-1) == "0:00:00"
    assert eta_seconds(10, 0, 5) is None and eta_seconds(10, 2, None) is None
    assert eta_seconds(10, 2, 6) == 20
