"""The one progress display (``distattr.viz.progress.Progress``) of ``attribute``, dataset jobs and ``distattr stats``:
a bar on a terminal or in a notebook, plain lines at most every ``interval`` seconds in a log, nothing when off."""

import io

import pytest

from distattr.viz import progress
from distattr.viz.progress import DoneOfTotal, Progress


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


class Clock:
    """``time.monotonic`` of the progress module, moved by hand."""

    def __init__(self, monkeypatch):
        self.now = 1000.0
        monkeypatch.setattr(progress.time, "monotonic", lambda: self.now)


def test_off_a_terminal_lines_are_plain_and_at_most_every_interval(monkeypatch):
    clock, stream = Clock(monkeypatch), io.StringIO()
    bar = Progress("attributing", 100, "ex", file=stream, interval=30)
    assert bar.mode == "lines"
    for t, done in ((10, 10), (20, 10), (31, 20), (40, 10), (62, 10), (70, 10)):
        clock.now = 1000.0 + t
        bar(done, tokens=done * 10)
        if t == 40:
            bar.set_status("actors: 2 live, 0 loading, 0 pending, 0 lost")
    bar.close()
    text = stream.getvalue()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert len(lines) == 3  # at 31 s, at 62 s, and the last one at close
    assert lines[0].startswith("distattr: attributing: 40/100 (40%) [00:31<") and "tok/s" in lines[0]
    assert lines[1].startswith("distattr: attributing: 60/100 (60%)") and lines[1].endswith("0 lost]")
    assert lines[2].startswith("distattr: attributing: 70/100 (70%) [01:10<")


def test_off_a_terminal_short_work_writes_nothing_but_messages():
    stream = io.StringIO()
    bar = Progress("attributing", 10, file=stream)
    bar(10, 100)
    bar.write("distattr: actor 0 ready")
    bar.close()
    assert stream.getvalue() == "distattr: actor 0 ready\n"


def test_on_a_terminal_the_bar_advances_to_the_total():
    stream = FakeTTY()
    bar = Progress("Attributing with saliency", 10, file=stream, leave=True)
    assert bar.mode == "bar"
    bar(4, 400)
    bar(6, 600)
    assert bar._bar.n == bar._bar.total == 10
    bar.close()
    assert "10/10" in stream.getvalue() and "100%" in stream.getvalue() and "tok/s" in stream.getvalue()


def test_in_a_notebook_the_bar_is_used_whatever_the_stream(monkeypatch):
    monkeypatch.setattr(progress, "in_notebook", lambda: True)
    bar = Progress("x", 3, file=io.StringIO())
    assert bar.mode == "bar"
    bar.close()


@pytest.mark.parametrize("tty", [True, False])
def test_close_is_idempotent(monkeypatch, tty):
    clock, stream = Clock(monkeypatch), FakeTTY() if tty else io.StringIO()
    bar = Progress("x", 4, file=stream, interval=1)
    clock.now += 5
    bar(2)  # a line off a terminal
    bar.close()
    after = stream.getvalue()
    bar.close()
    bar(2)  # after close: ignored
    assert stream.getvalue() == after and bar.closed
    if not tty:
        assert after.count("\n") == 2


def test_disabled_shows_nothing(monkeypatch):
    Clock(monkeypatch)
    for stream in (io.StringIO(), FakeTTY()):
        bar = Progress("x", 4, file=stream, interval=0, enabled=False)
        bar(4, 10)
        bar.set_status("actors")
        bar.write("a message")
        bar.close()
        assert bar.mode == "off" and stream.getvalue() == ""


def test_show_progress_false_shows_nothing_even_on_a_terminal(tiny, monkeypatch):
    stream = FakeTTY()
    monkeypatch.setattr(progress.sys, "stderr", stream)
    m = tiny("gpt2", "saliency")
    m.attribute("the cat is", "the cat is in paris", show_progress=False)
    assert stream.getvalue() == ""
    m.attribute("the cat is", "the cat is in paris")
    assert "Attributing with saliency" in stream.getvalue()


def test_statistics_callback_counts_done_of_total():
    stream = FakeTTY()
    callback = DoneOfTotal("faithfulness (abs ranking)", file=stream, leave=True)
    for done in (8, 16, 20):
        callback(done, 20)
    assert callback.progress.n == 20 and callback.progress.total == 20
    callback.close()
    callback.close()
    assert "20/20" in stream.getvalue()
    DoneOfTotal("never called").close()


def test_stats_command_progress_is_the_component(monkeypatch):
    from distattr.cli import stats

    stream = io.StringIO()
    monkeypatch.setattr(progress.sys, "stderr", stream)
    callback = stats._progress("faithfulness (abs ranking)")
    callback(5, 5)
    assert callback.progress.mode == "lines" and callback.progress.n == 5
    callback.close()
    quiet = stats._progress("faithfulness (abs ranking)", enabled=False)
    quiet(5, 5)
    quiet.close()
    assert quiet.progress.mode == "off" and stream.getvalue() == ""


def test_dataset_job_reports_show_counts_and_failed_examples(monkeypatch):
    from distattr.jobs.actor import Report
    from distattr.jobs.runner import _show_report

    clock, stream = Clock(monkeypatch), io.StringIO()
    bar = Progress("attributing", 6, "ex", file=stream, interval=30)
    bar.set_status("actors: 1 live, 1 loading, 0 pending, 0 lost")
    clock.now += 31
    _show_report(bar, Report(unit=0, part=0, examples=4, steps=40, seconds=1.0, rank=0, pid=1,
                             failed=((3, "ex-3", "too long"),)))
    lines = stream.getvalue().splitlines()
    assert lines[0] == "distattr: example 3 ('ex-3') failed: too long"
    assert lines[1].startswith("distattr: attributing: 4/6 (67%)") and "tok/s; actors: 1 live, 1 loading" in lines[1]
