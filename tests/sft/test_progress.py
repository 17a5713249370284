"""q_tuning.observe.progress: the count / rate / ETA lines, the modes, nesting, rank 0 only, and
the lines `q-tuning-eval` prints while it decodes."""

from __future__ import annotations

import io
import json
import logging
import re
import time

import pytest

from q_tuning.observe.progress import MODE_ENV, Progress, progress_mode


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _lines(**kw) -> tuple[Progress, io.StringIO, Clock]:
    stream, clock = io.StringIO(), Clock()
    bar = Progress(stream=stream, clock=clock, enabled=True, mode="lines", interval=3600, **kw)
    return bar, stream, clock


def test_status_has_count_rate_and_eta():
    bar, stream, clock = _lines(what="scoring", total=1000, unit="samples")
    clock.now += 8.0
    bar.update(320)
    # 320 in 8 s: 40/s; 680 left: 17 s
    assert bar.status() == "scoring: 320/1000 samples (40.0 samples/s, ETA 17 s)"
    clock.now += 92.0
    bar.update(280)  # 600 in 100 s: 6/s; 400 left: 66.7 s, shown as whole seconds
    assert bar.status() == "scoring: 600/1000 samples (6.0 samples/s, ETA 01:06)"
    bar.close()
    assert stream.getvalue().splitlines() == [
        "scoring ... (1000 samples)",
        "scoring: done, 600/1000 samples in 01:40 (6.0 samples/s)"]


def test_second_rate_and_unknown_total():
    bar, stream, clock = _lines(what="decoding", unit="rows", rate_unit="tokens")
    clock.now += 4.0
    bar.update(2, extra=10)
    bar.update(0, extra=90)
    assert bar.status() == "decoding: 2 rows (0.5 rows/s, 25 tokens/s, 4 s)"
    bar.close()
    assert stream.getvalue().splitlines()[-1] == \
        "decoding: done, 2 rows in 4 s (0.5 rows/s, 25 tokens/s)"


def test_opaque_wait_says_still_running_from_its_thread():
    stream = io.StringIO()
    with Progress("loading weights", enabled=True, mode="lines", interval=0.05,
                  stream=stream):
        time.sleep(0.3)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "loading weights ..."
    assert re.fullmatch(r"loading weights: done in \d+\.\d s", lines[-1])
    still = lines[1:-1]
    assert len(still) >= 2 and all(re.fullmatch(r"loading weights: still running \(\d+ s\)", s)
                                   for s in still)


def test_a_failure_says_stopped_not_done():
    bar, stream, clock = _lines(what="export")
    with pytest.raises(RuntimeError):
        with bar:
            clock.now += 3
            raise RuntimeError("disk full")
    assert stream.getvalue().splitlines()[-1] == "export: stopped after 3 s"


def test_only_the_innermost_ticks_and_it_inherits_the_log(caplog):
    stream = io.StringIO()
    log = logging.getLogger("q_tuning.test_progress")
    with caplog.at_level(logging.INFO, logger=log.name):
        with Progress("outer", enabled=True, mode="lines", interval=0.05, stream=stream, log=log):
            with Progress("inner", total=3, unit="tensors", enabled=True, mode="lines",
                          interval=0.05, stream=stream) as inner:
                inner.update(1)
                time.sleep(0.3)
                inner.update(2)
    assert stream.getvalue() == ""  # every line went to the outer one's log
    said = [r.getMessage() for r in caplog.records]
    assert said[:2] == ["outer ...", "inner ... (3 tensors)"]
    ticks = said[2:-2]
    assert ticks and all(t.startswith("inner: 1/3 tensors") for t in ticks)
    assert said[-2].startswith("inner: done, 3/3 tensors in ")
    assert said[-1].startswith("outer: done in ")


def test_disabled_and_off_print_nothing(monkeypatch):
    stream = io.StringIO()
    with Progress("x", total=2, enabled=False, stream=stream) as bar:
        bar.update(2)
    monkeypatch.setenv(MODE_ENV, "off")
    with Progress("y", total=2, enabled=True, stream=stream) as bar:
        bar.update(2)
    assert stream.getvalue() == ""


def test_mode_follows_the_terminal_unless_forced(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv(MODE_ENV, raising=False)
    assert progress_mode(io.StringIO()) == "lines"  # a log file: plain lines
    assert progress_mode(Tty()) == "bar"
    monkeypatch.setenv(MODE_ENV, "bar")
    assert progress_mode(io.StringIO()) == "bar"
    monkeypatch.setenv(MODE_ENV, "sometimes")
    with pytest.raises(ValueError, match=MODE_ENV):
        progress_mode()


def test_bar_mode_draws_a_tqdm_bar_and_ends_with_the_done_line():
    stream = io.StringIO()
    with Progress("scoring", total=4, unit="samples", enabled=True, mode="bar",
                  stream=stream) as bar:
        for _ in range(4):
            bar.update(1)
    text = stream.getvalue()
    assert "\r" in text and "scoring:" in text and "4/4" in text
    assert text.splitlines()[-1].startswith("scoring: done, 4/4 samples in ")


def test_eval_prints_rows_and_tokens_per_second(tmp_path_factory, monkeypatch, capsys):
    """`q-tuning-eval` on a tiny random Llama: the decoding lines count rows and tokens."""
    pytest.importorskip("transformers")
    from q_tuning.sft.evaluate import cli as E
    from tests.harness.hf import save_tiny_llama

    tmp_path = tmp_path_factory.mktemp("eval_progress")
    folder = tmp_path / "model"
    save_tiny_llama(folder, tmp_path_factory.getbasetemp() / "q_tuning_cache")
    rows = [{"prompt": f"What is {i} plus {i}?", "response": f"{2 * i}\n#### {2 * i}",
             "answer": 2 * i} for i in range(5)]
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setenv(MODE_ENV, "lines")
    E.main(["--hf-checkpoint", str(folder), "--data-path", str(data), "--batch-size", "2",
            "--max-new-tokens", "6"])
    err = capsys.readouterr().err.splitlines()
    assert "decoding ... (5 rows)" in err
    (done,) = [line for line in err if line.startswith("decoding: done")]
    assert re.fullmatch(r"decoding: done, 5/5 rows in \d+ s \(\d+\.\d rows/s, \d+ tokens/s\)",
                        done), done


def test_interval_comes_from_the_environment_and_is_checked(monkeypatch):
    from q_tuning.observe.progress import INTERVAL_ENV

    monkeypatch.setenv(INTERVAL_ENV, "2.5")
    assert Progress("x", enabled=False).interval == 2.5
    for bad in ("0", "-1", "soon", "nan"):
        monkeypatch.setenv(INTERVAL_ENV, bad)
        with pytest.raises(ValueError, match=f"{INTERVAL_ENV} must be a number > 0"):
            Progress("x", enabled=False)
