"""Progress output: a redrawn bar on a terminal, throttled plain lines otherwise."""

from __future__ import annotations

import io

from mp_eplb.progress import Progress, announce


def test_plain_stream_gets_periodic_lines_and_a_final_one() -> None:
    out = io.StringIO()
    progress = Progress(100, "demo steps", stream=out, every_s=3600.0)
    for done in range(1, 101):
        progress.update(done)
    progress.close("2 rebalances finished")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2  # the first update, then the final line; nothing in between
    assert lines[0].startswith("demo steps 1/100 (")
    assert lines[1].startswith("demo steps 100/100 (") and lines[1].endswith(
        "2 rebalances finished")
    assert "\r" not in out.getvalue()


def test_terminal_gets_a_bar_redrawn_in_place() -> None:
    out = io.StringIO()
    progress = Progress(4, "faults", stream=out, tty=True)
    progress.update(2, "rebalancing")
    progress.close()
    text = out.getvalue()
    assert text.startswith("\r\x1b[Kfaults [############............] 2/4 0 s rebalancing")
    assert "\r\x1b[Kfaults [########################] 2/4" not in text
    assert text.endswith("\n") and "[############............] 2/4" in text


def test_announce_writes_one_flushed_line() -> None:
    out = io.StringIO()
    announce("starting 2 rank processes", out)
    assert out.getvalue() == "starting 2 rank processes\n"
