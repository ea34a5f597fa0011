"""The summary's HTML pages for the Snakemake report: self-contained, every text HTML-escaped."""

from __future__ import annotations

import html
import re
from collections.abc import Mapping

import pandas as pd

from .plots import time_unit

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; }}
th, td {{ border: 1px solid #ccc; padding: 0.35em 0.6em; vertical-align: top; text-align: left; }}
th {{ background: #f0f0f0; }}
td.text {{ white-space: pre-wrap; max-width: 32em; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
</style>
</head>
<body>
<h1>{title}</h1>
{body}
</body>
</html>
"""


def _table_page(title: str, note: str, head: str, rows: list[str]) -> str:
    """A standalone page: title, a note, and one table (cells already escaped)."""
    body = (
        f"<p>{html.escape(note)}</p>\n<table>\n<tr>{head}</tr>\n" + "\n".join(rows) + "\n</table>"
    )
    return _PAGE.format(title=html.escape(title), body=body)


def summary_html(table: pd.DataFrame) -> str:
    """The summary table as a standalone page: rounded numbers, units in two-line headers.

    It fits the report's pane in a 1400-pixel window; summary.csv keeps every column (perplexity
    too) at full precision.
    """
    time_scale, unit = time_unit(table["train_wall_sec"].max())
    columns = [  # (column of `table`, header lines, format)
        ("n_params", ("parameters", "(millions)"), lambda v: f"{v / 1e6:.3g}"),
        ("best_step", ("best", "step"), "{:,.0f}".format),
        ("val_loss", ("val loss", "(nats/token)"), "{:.3f}".format),
        ("val_bpb", ("val bpb", "(bits/byte)"), "{:.3f}".format),
        ("test_loss", ("test loss", "(nats/token)"), "{:.3f}".format),
        ("test_bpb", ("test bpb", "(bits/byte)"), "{:.3f}".format),
        ("train_tokens_per_sec", ("speed", "(k tokens/s)"), lambda v: f"{v / 1e3:,.1f}"),
        ("train_wall_sec", ("train time", f"({unit})"), lambda v: f"{v / time_scale:,.1f}"),
    ]
    head = "<th>model</th>" + "".join(
        f"<th>{'<br>'.join(map(html.escape, lines))}</th>" for _, lines, _ in columns
    )
    rows = []
    for record in table.to_dict("records"):
        cells = [f"<th>{html.escape(str(record['model']))}</th>"]
        for col, _, fmt in columns:
            text = "n/a" if pd.isna(record[col]) else fmt(record[col])
            cells.append(f'<td class="num">{text}</td>')
        rows.append(f"<tr>{''.join(cells)}</tr>")
    note = (
        "Losses are cross-entropy in nats per token, bpb is bits per byte of text. Rounded here; "
        "summary.csv has every column at full precision, perplexity (exp(loss)) too."
    )
    return _table_page("Model summary", note, head, rows)


def sample_text(completion: str) -> str:
    """A completion as shown: no trailing whitespace, runs of blank lines cut to one."""
    return re.sub(r"\n[ \t]*\n(?:[ \t]*\n)+", "\n\n", completion.rstrip())


def samples_html(metrics: Mapping[str, dict]) -> str:
    """One row per prompt, one column per model's completion, all text HTML-escaped."""
    completions = {
        model: {s["prompt"]: s["completion"] for s in m["samples"]} for model, m in metrics.items()
    }
    prompts = list(dict.fromkeys(p for by_prompt in completions.values() for p in by_prompt))
    head = "<th>prompt</th>" + "".join(f"<th>{html.escape(model)}</th>" for model in completions)
    rows = []
    for prompt in prompts:
        cells = [f'<td class="text"><b>{html.escape(prompt)}</b></td>']
        for by_prompt in completions.values():
            text = by_prompt.get(prompt)
            if text is not None:
                text = f"<b>{html.escape(prompt)}</b>{html.escape(sample_text(text))}"
            cells.append(f'<td class="text">{text or ""}</td>')
        rows.append(f"<tr>{''.join(cells)}</tr>")
    note = "Each cell is the prompt (bold) and its continuation by the model's best checkpoint."
    return _table_page("Generated samples", note, head, rows)
