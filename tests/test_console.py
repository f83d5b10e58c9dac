"""The console in a log file: whole lines, no terminal escape codes, even with nested bars."""

import io

from cxrjax import console


def test_nested_bars_in_a_log_are_plain_lines(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr(console.sys, "stderr", log)
    monkeypatch.setattr(console, "_PIPE_INTERVAL_S", 0.0)
    outer = console.progress(total=3, desc="train", unit="step")
    for _ in range(3):
        outer.update(1)
        for _ in console.progress(range(4), desc="val", unit="batch", leave=False):
            pass
    outer.close()
    text = log.getvalue()
    assert "\x1b" not in text and "\r" not in text
    lines = text.splitlines()
    assert any(line.startswith("val") for line in lines)
    assert lines[-1].startswith("train") and "3/3" in lines[-1]
