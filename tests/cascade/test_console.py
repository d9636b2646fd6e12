"""`cascade.console`: one progress display (a tqdm bar on a terminal; throttled plain lines in a log,
never on stdout) and one way to count nouns in messages."""

import io
import os

import pytest

from cascade import cli
from cascade.console import DEFAULT_INTERVAL, duration, format_table, plural, progress_bar

from tests.shared_data import DATA

BIN = os.path.join(DATA, "stories260K", "stories260K.bin")
VAL = os.path.join(DATA, "text", "tinystories_val.txt")


class Clock:
    """A fake monotonic clock the test moves by hand."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class Log(io.StringIO):
    """A log file: not a terminal."""

    def isatty(self):
        return False


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture(autouse=True)
def default_environment(monkeypatch):
    monkeypatch.delenv("CASCADE_PROGRESS", raising=False)
    monkeypatch.delenv("CASCADE_PROGRESS_INTERVAL", raising=False)


def test_plural_counts_a_noun():
    assert plural(1, "round") == "1 round"
    assert plural(0, "round") == "0 rounds"
    assert plural(2, "document") == "2 documents"
    assert plural(1200, "token") == "1,200 tokens"
    assert plural(1, "matrix", "matrices") == "1 matrix"
    assert plural(3, "matrix", "matrices") == "3 matrices"


def test_a_table_is_as_wide_as_its_widest_cells_text_left_numbers_right():
    rows = [("fp32", "5.1234", "1,048,576"), ("int4-g32", "5.3012", 163840)]
    assert format_table(rows, ("spec", "ppl", "weight bytes")).splitlines() == [
        "spec         ppl  weight bytes",
        "fp32      5.1234     1,048,576",
        "int4-g32  5.3012        163840"]


def test_a_table_takes_alignment_indent_and_no_header_and_never_ends_a_line_in_spaces():
    text = format_table([("mode", "speculative"), ("answered by", "large"), ("note", "")], align="<<", indent="  ")
    assert text.splitlines() == ["  mode         speculative", "  answered by  large", "  note"]
    assert format_table([], ("a", "b")) == "a  b"
    assert format_table([("x", "1")], ("name", "")) == "name\nx     1"
    with pytest.raises(ValueError, match="one '<' or '>' per column"):
        format_table([("a", "b")], align="<")


def test_duration_reads_like_a_person_writes_it():
    assert duration(4.24) == "4.2s"
    assert duration(42) == "42s"
    assert duration(19 * 60 + 38) == "19m 38s"
    assert duration(2 * 3600 + 5 * 60 + 9) == "2h 05m"


def test_off_a_terminal_plain_lines_at_most_one_per_interval_then_a_final_line():
    clock, log = Clock(), Log()
    bar = progress_bar(total=500, desc="qat", unit="step", file=log, clock=clock, interval=30)
    for step in range(1, 501):
        clock.now += 3  # 3 s a step: a line every 10 steps at most
        bar.set_postfix(loss=f"{step / 100:.2f}")
        bar.update()
    bar.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    # 1500 s of work, one line each 30 s (after 10 steps, then every 10), and the final line
    assert len(lines) == 1500 // 30 + 1
    # hand-computed: at step 10, 30 s in: 3 s/step, 490 steps left -> 1470 s = 24m 30s
    assert lines[0] == "qat: 10/500 steps (2%), 3 s/step, eta 24m 30s, loss=0.10"
    assert lines[1].startswith("qat: 20/500 steps (4%), 3 s/step, eta 24m 00s")
    assert lines[-1] == "qat: 500/500 steps in 25m 00s (3 s/step), loss=5.00"


def test_work_shorter_than_the_interval_prints_nothing():
    clock, log = Clock(), Log()
    for _ in progress_bar(range(20), desc="quantize", unit="tensor", file=log, clock=clock, interval=30):
        clock.now += 1  # 20 s in all
    assert log.getvalue() == ""


def test_iterating_counts_each_item_when_it_is_done_and_a_slow_single_item_still_gets_a_final_line():
    clock, log = Clock(), Log()
    seen = []
    for i in progress_bar([10, 20], desc="bench", unit="run", file=log, clock=clock, interval=30):
        seen.append(i)
        clock.now += 40
    assert seen == [10, 20]
    assert log.getvalue().splitlines() == ["bench: 1/2 runs (50%), 40 s/run, eta 40s",
                                           "bench: 2/2 runs (100%), 40 s/run",
                                           "bench: 2/2 runs in 1m 20s (40 s/run)"]


def test_a_run_cut_short_says_where_it_stopped_and_a_resumed_run_rates_only_its_own_steps():
    clock, log = Clock(), Log()
    bar = progress_bar(total=100, initial=50, desc="train", unit="step", file=log, clock=clock, interval=0)
    clock.now += 0.5
    bar.update(5)
    clock.now += 0.5
    bar.close()
    assert log.getvalue().splitlines() == ["train: 55/100 steps (55%), 10 steps/s, eta 4.5s",
                                           "train: stopped at 55/100 steps after 1.0s"]


def test_progress_goes_to_stderr_only(capsys):
    clock = Clock()
    bar = progress_bar(total=3, desc="eval", unit="window", clock=clock, interval=0)  # file: sys.stderr now
    for _ in range(3):
        clock.now += 2
        bar.update()
    bar.close()
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines()[-1] == "eval: 3/3 windows in 6.0s (2 s/window)"


def _lines_of_four_2s_steps() -> list[str]:
    clock, log = Clock(), Log()
    bar = progress_bar(total=4, desc="x", unit="step", file=log, clock=clock)
    for _ in range(4):
        clock.now += 2
        bar.update()
    bar.close()
    return log.getvalue().splitlines()


def test_the_interval_comes_from_the_environment(monkeypatch):
    assert DEFAULT_INTERVAL > 8 and _lines_of_four_2s_steps() == []  # 8 s of work: under the default
    monkeypatch.setenv("CASCADE_PROGRESS_INTERVAL", "5")
    # a line at 6 s (5 s passed), none at 8 s (2 s since), then the final line
    assert _lines_of_four_2s_steps() == ["x: 3/4 steps (75%), 2 s/step, eta 2.0s", "x: 4/4 steps in 8.0s (2 s/step)"]
    monkeypatch.setenv("CASCADE_PROGRESS_INTERVAL", "0")
    assert len(_lines_of_four_2s_steps()) == 4 + 1


def test_off_and_disabled_show_nothing_but_still_iterate(monkeypatch):
    log = Log()
    assert list(progress_bar(range(3), enabled=False, file=log, interval=0)) == [0, 1, 2]
    monkeypatch.setenv("CASCADE_PROGRESS", "off")
    assert list(progress_bar(range(3), file=log, interval=0)) == [0, 1, 2]
    assert log.getvalue() == ""


def test_a_terminal_gets_a_tqdm_bar_and_plain_mode_forces_lines(monkeypatch):
    from tqdm import tqdm

    term = Terminal()
    bar = progress_bar(total=2, desc="eval", unit="window", file=term)
    assert isinstance(bar, tqdm)
    bar.update(2)
    bar.close()
    assert "\r" in term.getvalue() and "eval" in term.getvalue()
    monkeypatch.setenv("CASCADE_PROGRESS", "plain")
    term = Terminal()
    bar = progress_bar(total=2, desc="eval", unit="window", file=term, interval=0)
    assert not isinstance(bar, tqdm)
    bar.update(2)
    bar.close()
    assert "\r" not in term.getvalue() and term.getvalue().startswith("eval: 2/2 windows")


@pytest.mark.parametrize("name, value, message", [
    ("CASCADE_PROGRESS", "bar", "CASCADE_PROGRESS='bar': use one of auto, plain, off"),
    ("CASCADE_PROGRESS_INTERVAL", "-1", "CASCADE_PROGRESS_INTERVAL='-1'"),
    ("CASCADE_PROGRESS_INTERVAL", "soon", "CASCADE_PROGRESS_INTERVAL='soon'"),
    ("CASCADE_PROGRESS_INTERVAL", "nan", "CASCADE_PROGRESS_INTERVAL='nan'"),
])
def test_a_bad_setting_is_a_usage_error_before_any_work(monkeypatch, capsys, name, value, message):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        progress_bar(total=1)
    assert cli.main(["plan"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"error: {message}") and len(err.strip().splitlines()) == 1
    assert cli.main(["plan", "--help"]) == 0  # the help still works


def test_a_command_logging_to_a_file_prints_plain_progress_lines_and_counts_in_words(monkeypatch, capsys, tmp_path):
    """`qat` forced a tqdm bar into a log (carriage returns) and said "QAT 1 steps"; captured stderr
    is not a terminal: plain lines, no carriage return, "1 step"."""
    text = tmp_path / "small.txt"
    with open(VAL, encoding="utf-8") as f:
        text.write_text(f.read(20_000))
    monkeypatch.setenv("CASCADE_PROGRESS_INTERVAL", "0")
    code = cli.main(["qat", BIN, "--quant", "int8", "--data", str(text), "--steps", "1", "--batch-size", "1",
                     "--seq-len", "16", "-o", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "\r" not in err
    assert "qat: 1/1 step (100%)" in err  # the line of the step
    assert "qat: 1/1 step in " in err  # and the final line
    assert "QAT 1 step;" in err and "QAT 1 steps" not in err
