"""The summary's HTML pages for the Snakemake report: self-contained, every text HTML-escaped.

summary_html      the table by setting (mean ± 95% interval over seeds), each setting against the
                  reference setting, and the table of runs
samples_html      each setting's completions of the same prompts
run_settings_html each run's settings as its config.json and metrics.json record them
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Callable, Mapping, Sequence

import pandas as pd

from .records import RunRecord, recorded_settings
from .tables import time_unit

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
td.num {{ text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }}
</style>
</head>
<body>
<h1>{title}</h1>
{body}
</body>
</html>
"""
Column = tuple[str, tuple[str, ...], Callable]  # (column of the table, header lines, cell text)


def page(title: str, *parts: str) -> str:
    """A standalone page: a title and its parts (already escaped)."""
    return _PAGE.format(title=html.escape(title), body="\n".join(parts))


def para(text: str) -> str:
    return f"<p>{html.escape(text)}</p>"


def table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A table from cells already made (<th> or <td>)."""
    lines = [f"<tr>{''.join(head)}</tr>", *(f"<tr>{''.join(row)}</tr>" for row in rows)]
    return "<table>\n" + "\n".join(lines) + "\n</table>"


def header(lines: Sequence[str]) -> str:
    return f"<th>{'<br>'.join(map(html.escape, lines))}</th>"


def name_cell(name: str) -> str:
    """A run or setting name as a header cell; a long one may break after a hyphen."""
    return f"<th>{html.escape(name).replace('-', '-<wbr>')}</th>"


MARK = "⚠"  # a setting whose runs, or whose runs and the reference's, ran differently


def _numbers(frame: pd.DataFrame, first: str, columns: Sequence[Column],
             marked: Sequence[str] = ()) -> str:
    """One row per record: `first` as a header cell (MARK after the names in `marked`), then each
    column's text, right-aligned."""
    head = [header((first,)), *(header(lines) for _, lines, _ in columns)]
    rows = [
        [name_cell(str(record[first]) + (f" {MARK}" if record[first] in marked else "")),
         *(cell(record) for _, _, cell in columns)]
        for record in frame.to_dict("records")
    ]
    return table(head, rows)


def ran_differently(frame: pd.DataFrame) -> dict[str, str]:
    """setting -> how its runs ran differently (tables.ran_differently), for the settings it names."""
    if "ran_differently" not in frame.columns:
        return {}
    texts = frame.drop_duplicates("setting").set_index("setting")["ran_differently"]
    return {setting: text for setting, text in texts.items() if isinstance(text, str) and text}


def _listed(flags: Mapping[str, str]) -> str:
    """One item per flagged setting: 'condor: device: cpu (seed 1) / NVIDIA H200 (seeds 2, 3)'."""
    items = "".join(f"<li>{html.escape(f'{setting}: {text}')}</li>" for setting, text in flags.items())
    return f"<ul>{items}</ul>"


def _num(key: str, fmt: str, scale: float = 1.0) -> Callable:
    def cell(record) -> str:
        value = record[key]
        text = "n/a" if pd.isna(value) else format(value / scale, fmt)
        return f'<td class="num">{text}</td>'

    return cell


def _mean_ci(key: str) -> Callable:
    """mean ± half-width of the 95% interval; the mean alone from one run; n/a from none."""

    def cell(record) -> str:
        mean, half = record[f"{key}_mean"], record[f"{key}_ci95"]
        text = (
            "n/a"
            if pd.isna(mean)
            else f"{mean:.3f}"
            if pd.isna(half)
            else f"{mean:.3f} ± {half:.3f}"
        )
        return f'<td class="num">{text}</td>'

    return cell


def _signed(values: Sequence[float]) -> list[str]:
    """Signed numbers shown together, at one precision: 3 decimals, or as many more as give the
    smallest nonzero one 2 significant digits (so none but an exact zero reads 0.000), up to 6;
    past that, 2 significant digits in scientific notation."""
    smallest = min((abs(v) for v in values if v != 0), default=1.0)
    decimals = 3 if smallest >= 1e-3 else 1 - math.floor(math.log10(smallest))
    fmt = f"+.{decimals}f" if decimals <= 6 else "+.1e"
    return [format(v + 0.0, fmt) for v in values]  # + 0.0: no -0


def _difference(record, key: str) -> str:
    """A difference above its 95% interval, signed; the difference alone where there is no interval.
    A difference below 0.001 gets the digits that show it and its interval's sign (_signed)."""
    d, lo, hi = record[f"{key}_difference"], record[f"{key}_ci95_low"], record[f"{key}_ci95_high"]
    if pd.isna(d):
        text = "n/a"
    elif pd.isna(lo):
        (text,) = _signed([d])
    else:
        shown = _signed([d, lo, hi])
        text = f"{shown[0]}<br>[{shown[1]}, {shown[2]}]"
    return f'<td class="num">{text}</td>'


def _ok_runs(record) -> str:
    """A setting's ok runs in a comparison, and under them the runs left out, if any."""
    n, left_out = int(record["val_loss_n"]), int(record["val_loss_n_excluded"])
    return f'<td class="num">{n}' + (f"<br>({left_out} left out)" if left_out else "") + "</td>"


def _verdict(text: str) -> str:
    return f"<td>{html.escape(text).replace('no clear ', 'no clear<br>')}</td>"


def comparison_section(comparison: pd.DataFrame, settings: Sequence[str]) -> list[str]:
    """The summary page's part on the settings against the reference (tables.comparison_table)."""
    if comparison.empty:
        text = (
            "No reference setting: set compare_to in the config to compare every other setting with one."
            if len(settings) > 1
            else "One setting: nothing to compare."
        )
        return ["<h2>Against a reference</h2>", para(text)]
    reference = comparison["reference"].iloc[0]
    flags = ran_differently(comparison)
    wide = comparison.drop(columns=["ran_differently"], errors="ignore").pivot(index="setting", columns="metric")
    wide.columns = [f"{metric}_{stat}" for stat, metric in wide.columns]
    wide = wide.loc[list(dict.fromkeys(comparison["setting"]))].reset_index()
    columns: list[Column] = [
        ("n", ("n", "(ok runs)"), _ok_runs),
        ("val", ("val loss", "difference", "(nats/token)"), lambda r: _difference(r, "val_loss")),
        ("val_verdict", ("val", "verdict"), lambda r: _verdict(r["val_loss_verdict"])),
        ("test", ("test loss", "difference", "(nats/token)"), lambda r: _difference(r, "test_loss")),
        ("test_verdict", ("test", "verdict"), lambda r: _verdict(r["test_loss_verdict"])),
        ("test_p", ("p", "(test loss)"), _num("test_loss_p_value", ".2g")),
    ]
    n_reference = int(comparison["n_reference"].iloc[0])
    left_out = int(comparison["n_reference_excluded"].iloc[0])
    n_reference_text = f"{n_reference} ok runs" + (f", {left_out} left out" if left_out else "")
    return [
        f"<h2>Against {html.escape(reference)}</h2>",
        para(
            f"Each setting's mean minus the mean of {reference} ({n_reference_text}), above the 95% "
            "interval of that difference by Welch's t-test over the ok runs of both, and the test's "
            "two-sided p-value; negative is a lower loss. better or worse: the interval lies below or "
            "above zero; too few runs: either side has fewer than two ok runs, and one run shows no "
            "spread. Runs left out (diverged or failed) are in no test: a setting that diverged at "
            "some seeds is compared over the others. Each row is a test of its own: among twenty settings no different from the "
            "reference, about one looks better or worse by chance. Bits per byte are a fixed multiple of the loss within one config and "
            "give the same verdicts; summary_vs_reference.csv holds them and every p-value."
        ),
        _numbers(wide, "setting", columns, marked=list(flags)),
        *(
            [
                para(
                    f"{MARK}: these settings' runs and those of {reference} did not all run alike "
                    "(below; the Run settings page has each run's records), so a difference may "
                    "come from how they ran rather than from the setting. Their rows count every ok "
                    "run all the same."
                ),
                _listed(flags),
            ]
            if flags
            else []
        ),
    ]


def summary_html(runs: pd.DataFrame, by_setting: pd.DataFrame, comparison: pd.DataFrame) -> str:
    """The three tables, rounded, units in two-line headers; each fits the report's pane in a
    1400-pixel window. The CSV files keep every column at full precision."""
    settings_columns: list[Column] = [
        ("n_params", ("parameters", "(millions)"), _num("n_params", ".3g", 1e6)),
        ("n", ("n", "(ok runs)"), _num("n", ",.0f")),
        ("n_excluded", ("left out", "(runs)"), _num("n_excluded", ",.0f")),
        *(
            (f"{key}_mean", lines, _mean_ci(key))
            for key, lines in (
                ("val_loss", ("val loss", "(nats/token)")),
                ("val_bpb", ("val bpb", "(bits/byte)")),
                ("test_loss", ("test loss", "(nats/token)")),
                ("test_bpb", ("test bpb", "(bits/byte)")),
            )
        ),
    ]
    time_scale, unit = time_unit(runs["train_wall_sec"].max())
    run_columns: list[Column] = [
        ("status", ("status",), lambda r: f"<td>{html.escape(r['status'])}</td>"),
        ("best_step", ("best", "step"), _num("best_step", ",.0f")),
        ("val_loss", ("val loss", "(nats/token)"), _num("val_loss", ".3f")),
        ("val_bpb", ("val bpb", "(bits/byte)"), _num("val_bpb", ".3f")),
        ("test_loss", ("test loss", "(nats/token)"), _num("test_loss", ".3f")),
        ("test_bpb", ("test bpb", "(bits/byte)"), _num("test_bpb", ".3f")),
        (
            "train_tokens_per_sec",
            ("speed", "(k tokens/s)"),
            _num("train_tokens_per_sec", ",.1f", 1e3),
        ),
        ("train_wall_sec", ("train time", f"({unit})"), _num("train_wall_sec", ",.1f", time_scale)),
    ]
    left_out = runs[runs["status"] != "ok"]
    flags = ran_differently(by_setting)
    how = (
        "Each setting's ok runs differ only in their seed (and perhaps in what they record: "
        "log_every, save_every, max_gpus, wandb): they trained on the same kind of device, in the "
        "same precision, compiled alike, with as many processes (on the CPU, as many threads) and "
        "the same torch, as far as their records tell, and were evaluated on the same kind of "
        "device in the same precision."
        if not flags
        else f"Each setting's ok runs differ in their seed (and perhaps in what they record: "
        f"log_every, save_every, max_gpus, wandb), and those of the settings marked {MARK} also in "
        "how they ran (below; the Run settings page has each run's records): their numbers "
        "average runs that computed differently, all of them counted."
    )
    notes = "".join(
        f"<li><b>{html.escape(r['run'])}</b> {html.escape(r['status'])}: {html.escape(r['status_note'])}</li>"
        for r in left_out.to_dict("records")
    )
    return page(
        "Summary",
        "<h2>By setting</h2>",
        para(
            f"{how} Numbers are the mean over its ok runs "
            "± the half-width of the 95% Student-t interval of that mean (the mean alone from one "
            "run). Losses are cross-entropy in nats per token, bpb is bits per byte of text."
            + (f" {len(left_out)} runs left out: see their status below." if len(left_out) else "")
        ),
        _numbers(by_setting, "setting", settings_columns, marked=list(flags)),
        _listed(flags) if flags else "",
        *comparison_section(comparison, list(by_setting["setting"])),
        "<h2>Runs</h2>",
        _numbers(runs, "run", run_columns),
        f"<ul>{notes}</ul>" if notes else "",
        para(
            "Rounded here: summary.csv (runs) and summary_by_setting.csv (settings, standard "
            "deviation too) hold every column at full precision, perplexity (exp(loss)) too."
        ),
    )


def sample_text(completion: str) -> str:
    """A completion as shown: no trailing whitespace, runs of blank lines cut to one."""
    return re.sub(r"\n[ \t]*\n(?:[ \t]*\n)+", "\n\n", completion.rstrip())


def samples_html(samples: Mapping[str, list[dict]]) -> str:
    """One row per prompt, one column per entry of `samples` (column title -> its samples)."""
    completions = {
        title: {s["prompt"]: s["completion"] for s in rows} for title, rows in samples.items()
    }
    prompts = list(dict.fromkeys(p for by_prompt in completions.values() for p in by_prompt))
    head = ["<th>prompt</th>", *(f"<th>{html.escape(title)}</th>" for title in completions)]
    rows = []
    for prompt in prompts:
        cells = [f'<td class="text"><b>{html.escape(prompt)}</b></td>']
        for by_prompt in completions.values():
            text = by_prompt.get(prompt)
            if text is not None:
                text = f"<b>{html.escape(prompt)}</b>{html.escape(sample_text(text))}"
            cells.append(f'<td class="text">{text or ""}</td>')
        rows.append(cells)
    note = (
        "Each cell is the prompt (bold) and its continuation by the best checkpoint of the setting's "
        "first ok run (its seed in brackets when the setting has several)."
    )
    return page("Generated samples", para(note), table(head, rows))


def setting_samples(records: Sequence[RunRecord]) -> dict[str, list[dict]]:
    """Column title -> samples: each setting's first ok run (a setting with none gets no column)."""
    out: dict[str, list[dict]] = {}
    seeds = {}
    for r in records:
        seeds.setdefault(r.setting, []).append(r)
    for setting, runs in seeds.items():
        ok = [r for r in runs if r.status == "ok"]
        if ok:
            title = setting if len(runs) == 1 else f"{setting} (seed {ok[0].seed})"
            out[title] = ok[0].metrics["samples"]
    return out


def run_settings_html(records: Sequence[RunRecord]) -> str:
    """Each run's settings as recorded: those every run shares once, then those that differ."""
    settings = {r.name: recorded_settings(r) for r in records}
    keys = list(dict.fromkeys(k for s in settings.values() for k in s))
    shared = [k for k in keys if len({s.get(k, "") for s in settings.values()}) == 1]
    differing = [k for k in keys if k not in shared]
    first = next(iter(settings.values()))
    parts = [
        para(
            "As each run recorded them: config.json, written when training starts (the resolved "
            "train and model settings, the packed data and tokenizer it read, the device it ran "
            "on) and metrics.json (steps run, why it stopped). Runs off CUDA train in fp32 "
            "whatever train.precision asks; compile applies on CUDA only."
        ),
        "<h2>Shared by every run</h2>",
        table(
            [header(("setting",)), header(("value",))],
            [[f"<th>{html.escape(k)}</th>", f"<td>{html.escape(first[k])}</td>"] for k in shared],
        ),
    ]
    if len(settings) > 1:
        parts += [
            "<h2>Differing between runs</h2>",
            table(
                [header(("run",)), *(header((k,)) for k in differing)],
                [
                    [
                        f"<th>{html.escape(run)}</th>",
                        *(f"<td>{html.escape(s.get(k, ''))}</td>" for k in differing),
                    ]
                    for run, s in settings.items()
                ],
            ),
        ]
    return page("Run settings", *parts)
