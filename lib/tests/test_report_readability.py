"""What a person sees in the report: a summary table that fits the window, loss axes with enough
labelled ticks, samples without trailing blank lines."""

from __future__ import annotations

import math
import re
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tinylm.report import loss_axis
from tinylm.report.pages import samples_html, summary_html
from tinylm.report.tables import by_setting_table, comparison_table

# A 16 px sans-serif character, bold headers included (Chromium: 7.6 px on average), a cell's
# padding and border, the window.
CHAR_PX, CELL_PX, WINDOW_PX = 8, 24, 1400
REPORT_MENU_PX = 300  # the Snakemake report shows a page in an iframe beside its menu
# Runs named as the workflow names them, the longest a sweep gives in the demo configs.
LOSSES = {
    "baseline-seed1": 1.4929411452497,
    "baseline-seed2": 1.4951,
    "falcon_wide-lr0.0003-seed1": 1.58364860622,
    "falcon_wide-lr0.0003-seed2": 1.5999,
    "condor-seed1": 1.6305643817,
}


def run_row(run: str, loss: float) -> dict:
    """A per-run row with the magnitudes of a full run on a GPU."""
    return {
        "run": run,
        "model": run.split("-")[0],
        "setting": run.rsplit("-seed", 1)[0],
        "seed": int(run.rsplit("seed", 1)[1]),
        "sweep": None,
        "status": "ok",
        "status_note": "",
        "n_params": 25_678_901,
        "best_step": 19_000,
        "val_loss": loss,
        "val_ppl": math.exp(loss),
        "val_bpb": loss / math.log(2) / 4.1,
        "test_loss": loss + 0.01,
        "test_ppl": math.exp(loss + 0.01),
        "test_bpb": (loss + 0.01) / math.log(2) / 4.1,
        "train_tokens_per_sec": 1_237_037.034,
        "train_wall_sec": 5432.1,
    }


class Rows(HTMLParser):
    """The cell texts of a page's tables, row by row (`tables`: one list of rows per table); <br>,
    and <wbr> where a browser may break a line that does not fit, become a line break."""

    def __init__(self, page: str):
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.rows: list[list[str]] = []
        self.cell: list[str] | None = None
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.rows = []
            self.tables.append(self.rows)
        elif tag == "tr":
            self.rows.append([])
        elif tag in ("th", "td"):
            self.cell = []
        elif tag in ("br", "wbr") and self.cell is not None:
            self.cell.append("\n")

    def handle_endtag(self, tag):
        if tag in ("th", "td") and self.cell is not None:
            self.rows[-1].append("".join(self.cell))
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)


@pytest.fixture(scope="module")
def summary_tables() -> list[list[list[str]]]:
    runs = pd.DataFrame([run_row(run, loss) for run, loss in LOSSES.items()])
    return Rows(summary_html(runs, by_setting_table(runs), comparison_table(runs, "baseline"))).tables


def test_summary_tables_fit_a_1400_pixel_window(summary_tables):
    assert len(summary_tables) == 3  # by setting, against the reference, then runs
    assert_fit(summary_tables)


def assert_fit(tables: list[list[list[str]]]) -> None:
    for head, *body in tables:
        assert all(len(row) == len(head) for row in body)
        # Headers break into lines of a word or two, run names after a hyphen; a column is as wide
        # as its longest line or number.
        lines = [line for text in head for line in text.split("\n")]
        assert max(map(len, lines)) <= 12, lines
        widest = [max(len(line) for line in text.split("\n")) for text in head]
        for row in body:
            widest = [
                max(w, *map(len, text.split("\n"))) for w, text in zip(widest, row, strict=True)
            ]
        width = sum(w * CHAR_PX + CELL_PX for w in widest)
        assert width <= WINDOW_PX - REPORT_MENU_PX - 2 * 24, (width, widest)  # and page margins


def test_summary_headers_carry_units_and_numbers_are_rounded(summary_tables):
    by_setting, _, runs = summary_tables
    text = " ".join(t for row in runs for t in row)
    for unit in ("nats/token", "bits/byte", "tokens/s", "(min)"):
        assert unit in text
    assert "1.493" in text and "1.4929" not in text  # summary.csv keeps the full value
    assert "90.5" in text  # 5432.1 s of training, shown in minutes
    baseline = next(row for row in by_setting if row[0] == "baseline")
    # mean ± the 95% interval's half-width over two seeds: t(1) = 12.706, sd = 0.00152
    assert baseline[4] == "1.494 ± 0.014", baseline


def test_settings_against_the_reference_show_difference_interval_and_verdict(summary_tables):
    _, against, _ = summary_tables
    head, *rows = against
    assert [row[0] for row in rows] == ["falcon_wide-\nlr0.0003", "condor"]  # not the reference itself
    falcon, condor = ({h.replace("\n", " "): cell for h, cell in zip(head, row, strict=True)} for row in rows)
    # means 1.591774 and 1.494021 over two seeds each; Welch's interval (scipy 1.17.1: 0.0016, 0.1939)
    assert falcon["val loss difference (nats/token)"] == "+0.098\n[+0.002, +0.194]"
    assert falcon["val verdict"] == "worse" and falcon["n (ok runs)"] == "2"
    assert falcon["p (test loss)"] == "0.049"
    assert condor["test loss difference (nats/token)"] == "+0.137"  # one run: no interval
    assert condor["test verdict"] == "too few runs" and condor["p (test loss)"] == "n/a"


def test_the_test_loss_columns_compare_the_test_losses():
    """In the fixture a test loss is its val loss + 0.01, so the val and test columns agree whichever
    loss each shows; here falcon's test losses are the reference's, its val losses not."""
    rows = [run_row(run, loss) for run, loss in LOSSES.items()]
    reference = [row["test_loss"] for row in rows if row["setting"] == "baseline"]
    for row, test_loss in zip([r for r in rows if r["model"] == "falcon_wide"], reversed(reference), strict=True):
        row["test_loss"] = test_loss
    runs = pd.DataFrame(rows)
    _, against, _ = Rows(summary_html(runs, by_setting_table(runs), comparison_table(runs, "baseline"))).tables
    head, falcon_row, _ = against
    falcon = {h.replace("\n", " "): cell for h, cell in zip(head, falcon_row, strict=True)}
    assert falcon["val verdict"] == "worse" and falcon["test verdict"] == "no clear\ndifference"
    assert falcon["test loss difference (nats/token)"].startswith("+0.000\n") and falcon["p (test loss)"] == "1"


def test_a_difference_below_a_thousandth_shows_its_digits_and_sign():
    """A difference of 4e-4 nats with its interval below zero reads as better, not as -0.000
    [-0.000, -0.000]; one of 3e-7 inside an interval of +-6e-5 shows in scientific notation."""
    losses = {"baseline": (1.49290, 1.49292), "owl": (1.49250, 1.49252), "emu": (1.49290 + 3e-7, 1.49292 + 3e-7)}
    runs = pd.DataFrame([run_row(f"{setting}-seed{i}", loss)
                         for setting, pair in losses.items() for i, loss in enumerate(pair, 1)])
    tables = Rows(summary_html(runs, by_setting_table(runs), comparison_table(runs, "baseline"))).tables
    assert_fit(tables)
    head, owl_row, emu_row = tables[1]
    owl, emu = ({h.replace("\n", " "): cell for h, cell in zip(head, row, strict=True)} for row in (owl_row, emu_row))
    # Welch: -0.0004 with half-width t(2) * 1.414e-5 = 6.08e-5
    for loss in ("val", "test"):
        assert owl[f"{loss} loss difference (nats/token)"] == "-0.00040\n[-0.00046, -0.00034]"
        assert owl[f"{loss} verdict"] == "better"
        assert emu[f"{loss} loss difference (nats/token)"] == "+3.0e-07\n[-6.1e-05, +6.1e-05]"
    assert tables[0][1][4] == "1.493 ± 0.000"  # other numbers keep their 3 decimals


def test_samples_end_without_blank_lines():
    completions = {"a": " upon a time.\n\n\n\n  \n", "b": " there was\n\n\n\na cat. \t\n"}
    page = samples_html(
        {model: [{"prompt": "Once", "completion": text}] for model, text in completions.items()}
    )
    cells = [text for row in Rows(page).rows[1:] for text in row]
    assert len(cells) == 3
    for text in cells:
        assert text == text.rstrip(), repr(text)
        assert "\n\n\n" not in text, repr(text)
    assert "Once there was\n\na cat." in cells


@pytest.mark.parametrize(
    ("lo", "hi"), [(2.5, 9.0), (1.2, 9.0), (0.3, 11.0), (2.2, 6.6), (1.4, 1.9), (0.9, 1.1)]
)
def test_loss_axis_has_enough_labelled_ticks(lo, hi):
    fig = Figure(figsize=(5.5, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    losses = np.linspace(lo, hi, 50)
    ax.plot(np.arange(50), losses)
    loss_axis(ax, losses)
    fig.canvas.draw()
    y0, y1 = sorted(ax.get_ylim())
    labels = [
        t.get_text()
        for t in [*ax.get_yticklabels(), *ax.get_yticklabels(minor=True)]
        if y0 <= t.get_position()[1] <= y1 and t.get_text()
    ]
    assert 4 <= len(labels) <= 12, labels
    assert len(set(labels)) == len(labels), labels
    assert all(re.fullmatch(r"[0-9.]+", label) for label in labels), labels  # no 10^x notation


def test_the_comparison_shows_the_runs_it_left_out():
    rows = [run_row(run, loss) for run, loss in LOSSES.items()]
    rows.append({**run_row("falcon_wide-lr0.0003-seed3", math.nan), "status": "diverged", "status_note": "nan"})
    runs = pd.DataFrame(rows)
    page = summary_html(runs, by_setting_table(runs), comparison_table(runs, "baseline"))
    _, against, _ = Rows(page).tables
    head, falcon_row, condor_row = against
    falcon, condor = ({h.replace("\n", " "): cell for h, cell in zip(head, row, strict=True)}
                      for row in (falcon_row, condor_row))
    assert falcon["n (ok runs)"] == "2\n(1 left out)" and condor["n (ok runs)"] == "1"
    assert "baseline (2 ok runs)" in page
