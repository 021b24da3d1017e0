"""Rendering :class:`maps.report.Table` as Markdown, LaTeX (booktabs) and CSV, and writing them.

Markdown is what a person reads first: each metric cell is ``ours (n)``, then the paper's
number and the difference, then (ablation rows) the difference to the baseline row with its
Welch p-value and a verdict mark. LaTeX is a ``tabular`` fragment (needs ``booktabs`` and
``amssymb``); CSV is long format, one line per (row, metric), for further analysis.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, List, Optional, Sequence

from maps.errors import ConfigError
from maps.io import atomic_write_text
from maps.report.tables import ALPHA

__all__ = ["FORMATS", "EXTENSIONS", "render", "render_markdown", "render_latex", "render_csv",
           "write_tables", "latex_escape", "fmt_value"]

FORMATS = ("md", "latex", "csv")
EXTENSIONS = {"md": "md", "latex": "tex", "csv": "csv"}
#: column headers as the paper prints them
HEADERS_MD = {"params": "Params (M)", "iters": "Iters", "PQ": "PQ", "PQ_th": "PQ^th",
              "PQ_st": "PQ^st", "AP": "AP", "mIoU": "mIoU"}
HEADERS_TEX = {"params": "Params (M)", "iters": "Iters", "PQ": "PQ", "PQ_th": r"PQ$^{\mathrm{th}}$",
               "PQ_st": r"PQ$^{\mathrm{st}}$", "AP": "AP", "mIoU": "mIoU"}
VERDICT_MARK = {"supported": "✓", "direction": "↗", "contradicted": "✗", "not significant": "~",
                "untested": "", "no claim": "!"}
VERDICT_TEX = {"supported": r"$\checkmark$", "direction": r"$\nearrow$", "contradicted": r"$\times$",
               "not significant": r"$\sim$", "untested": "", "no claim": "!"}


# ----------------------------------------------------------------------------------------------
# numbers
# ----------------------------------------------------------------------------------------------
def fmt_value(metric: str, value: Optional[float]) -> str:
    """A metric as the paper prints it: one decimal; iterations as ``45k``; params ``45.9``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if metric == "iters":
        return f"{value / 1000:g}k" if value >= 1000 else f"{value:g}"
    if metric == "params":
        return f"{round(value, 1):g}"
    return f"{value:.1f}"


def _signed(value: float) -> str:
    return f"{round(value, 1) + 0.0:+.1f}"  # + 0.0: no "-0.0" for a tiny negative difference


def _p(p: Optional[float]) -> str:
    if p is None:
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _ours(cell: Any, metric: str) -> Optional[str]:
    if not cell.values:
        return None
    if metric == "iters":
        return fmt_value(metric, cell.mean)
    std = cell.std
    spread = f" ± {std:.1f}" if not math.isnan(std) else ""
    return f"{cell.mean:.1f}{spread} (n={cell.n})"


def _legend(table: Any) -> str:
    base = table.baseline_label
    paper = ("`paper` = the paper's number; Δ = ours − paper." if table.suite == "paper" else
             "This suite is not comparable to the paper's numbers: no `paper` cells; `claim` "
             "comes from the paper rows these rows mirror.")
    lines = [f"Source: {table.source}. Each cell: mean ± sample std (ddof=1) over finished seeds "
             f"(n); {paper}"]
    if base is not None:
        lines.append(f"`vs base` = ours − baseline row ({base}), Welch's t-test over seeds "
                     f"(two-sided p), with its 95% interval; `claim` = the paper's own "
                     f"difference. ✓ the runs support the claim in sign and size (p < 0.05, same "
                     f"sign, the claim inside our 95% interval), ↗ same sign but another size "
                     f"(the claim outside our interval), ✗ they contradict it (p < 0.05, opposite "
                     f"sign), ~ not significant, ! significant where the paper claims none.")
    return " ".join(lines)


# ----------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------
def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _extra_md(value: Any) -> str:
    if isinstance(value, bool):
        return "✓" if value else "✗"
    return _md_escape(value)


def _md_cell(row: Any, metric: str) -> str:
    cell = row.cells[metric]
    parts: List[str] = []
    ours = _ours(cell, metric)
    if ours is not None:
        parts.append(ours)
    elif row.runnable:
        parts.append(f"— ({row.missing()})" if row.n_done == 0 else "—")
    if cell.paper is not None:
        paper = f"paper {fmt_value(metric, cell.paper)}" + ("*" if cell.paper_reconstructed else "")
        if cell.diff is not None and metric != "iters":
            paper += f", Δ {_signed(cell.diff)}"
        parts.append(paper)
    c = cell.comparison
    if c is not None:
        text = f"vs base {_signed(c.delta)}, p={_p(c.p_value)}"
        if c.paper_delta is not None:
            text += f", claim {_signed(c.paper_delta)}"
        mark = VERDICT_MARK[c.verdict]
        parts.append(f"{text} {mark}".rstrip())
    return "<br>".join(parts) if parts else "-"


def render_markdown(table: Any) -> str:
    head = ["Row", *table.extra_columns, *(HEADERS_MD.get(c, c) for c in table.columns), "Runs"]
    out = [f"## Table {table.number}: {table.title} ({table.suite} suite)", "", _legend(table), "",
           "| " + " | ".join(_md_escape(h) for h in head) + " |",
           "|" + "|".join(["---"] * (1 + len(table.extra_columns))
                          + ["---:"] * len(table.columns) + ["---"]) + "|"]
    for row in table.rows:
        label = _md_escape(row.label) + (" (baseline)" if row.is_baseline else "")
        if row.run_of and row.run_of != row.name:
            label += f" [= {row.run_of}]"
        cells = [label, *(_extra_md(row.extra.get(k, "")) for k in table.extra_columns),
                 *(_md_cell(row, m) for m in table.columns), _md_escape(row.runs_text())]
        out.append("| " + " | ".join(cells) + " |")
    if any(c.paper_reconstructed for r in table.rows for c in r.cells.values() if c.paper is not None):
        out += ["", "\\* the paper's number is reconstructed from a garbled text extraction "
                "(`maps list --json` gives the reasoning)."]
    counts = table.verdicts()
    if counts:
        order = ("supported", "contradicted", "not significant", "no claim", "untested")
        out += ["", "Against the baseline: " + ", ".join(f"{counts[v]} {v}" for v in order if v in counts)
                + f" (of {sum(counts.values())} row-metric pairs compared; α = {ALPHA})."]
    if table.warnings:
        out += ["", "Warnings:", *(f"- {_md_escape(w)}" for w in table.warnings)]
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------------
# LaTeX
# ----------------------------------------------------------------------------------------------
_TEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                "^": r"\textasciicircum{}", "†": r"$^\dagger$", "±": r"$\pm$", "Δ": r"$\Delta$",
                "✓": r"$\checkmark$", "✗": r"$\times$", "×": r"$\times$", "—": "--", "−": "-"}


def latex_escape(text: Any) -> str:
    """Text safe inside a LaTeX tabular cell (special characters and the table's symbols)."""
    return "".join(_TEX_SPECIAL.get(ch, ch) for ch in str(text))


def _tex_cell(row: Any, metric: str) -> str:
    cell = row.cells[metric]
    if cell.values:
        if metric == "iters":
            main = fmt_value(metric, cell.mean)
        else:
            std = cell.std
            main = f"{cell.mean:.1f}" + (rf"$\pm${std:.1f}" if not math.isnan(std) else "")
            main += rf"\,{{\scriptsize ({cell.n})}}"
    elif row.runnable and row.n_done == 0:
        main = r"--\,{\scriptsize (" + latex_escape(row.missing()) + ")}"
    elif row.runnable:
        main = "--"
    else:
        main = ""
    notes = []
    if cell.paper is not None:
        notes.append(fmt_value(metric, cell.paper) + ("*" if cell.paper_reconstructed else ""))
        if cell.diff is not None and metric != "iters":
            notes[-1] += "/" + _signed(cell.diff)
    c = cell.comparison
    if c is not None:
        notes.append(rf"$\Delta_b${_signed(c.delta)}" + (" p=" + _p(c.p_value).replace("<", "$<$") if c.p_value is not None else "")
                     + VERDICT_TEX[c.verdict])
    if notes:
        main += r" {\scriptsize [" + "; ".join(notes) + "]}"
    return main.strip() or "--"


def render_latex(table: Any) -> str:
    n_extra = 1 + len(table.extra_columns)
    spec = "l" * n_extra + "r" * len(table.columns) + "l"
    head = ["Row", *(latex_escape(k) for k in table.extra_columns),
            *(HEADERS_TEX.get(c, latex_escape(c)) for c in table.columns), "Runs"]
    caption = latex_escape(f"Table {table.number} ({table.suite} suite): {table.title}. Mean ± std "
                           f"(ddof=1) over seeds (n); [paper/Δ ours − paper").replace("  ", " ")
    if table.baseline_label is not None:
        caption += latex_escape(f"; Δ_b vs baseline {table.baseline_label}, Welch p")
    caption += "]."
    out = [r"% generated by `maps tables`; needs \usepackage{booktabs,amssymb}",
           r"\begin{table}[t]", r"\centering", r"\footnotesize",
           rf"\caption{{{caption}}}", rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
           " & ".join(head) + r" \\", r"\midrule"]
    for row in table.rows:
        label = latex_escape(row.label) + (r" (base)" if row.is_baseline else "")
        extras = []
        for k in table.extra_columns:
            v = row.extra.get(k, "")
            extras.append((r"$\checkmark$" if v else r"$\times$") if isinstance(v, bool) else latex_escape(v))
        cells = [label, *extras, *(_tex_cell(row, m) for m in table.columns), latex_escape(row.runs_text())]
        out.append(" & ".join(cells) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------------
# CSV
# ----------------------------------------------------------------------------------------------
CSV_FIELDS = ("suite", "table", "experiment", "row", "run_of", "state", "runs", "metric", "n",
              "mean", "std", "values", "paper", "paper_reconstructed", "diff", "baseline", "delta_vs_baseline", "t",
              "dof", "p_value", "ci_low", "ci_high", "paper_delta", "verdict")


def _num(value: Optional[float]) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return repr(round(float(value), 6))


def render_csv(table: Any) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in table.rows:
        for metric in table.columns:
            cell = row.cells[metric]
            c = cell.comparison
            writer.writerow({
                "paper_reconstructed": int(cell.paper_reconstructed) if cell.paper is not None else "",
                "suite": table.suite, "table": table.number, "experiment": row.name,
                "row": row.label, "run_of": row.run_of or "", "state": row.state,
                "runs": row.runs_text(), "metric": metric, "n": cell.n,
                "mean": _num(cell.mean) if cell.values else "",
                "std": _num(cell.std) if cell.values else "",
                "values": ";".join(f"seed{s}={_num(v)}" for s, v in sorted(cell.values.items())),
                "paper": _num(cell.paper), "diff": _num(cell.diff),
                "baseline": c.baseline if c else "", "delta_vs_baseline": _num(c.delta) if c else "",
                "t": _num(c.t) if c else "", "dof": _num(c.dof) if c else "",
                "p_value": _num(c.p_value) if c else "", "ci_low": _num(c.ci_low) if c else "",
                "ci_high": _num(c.ci_high) if c else "",
                "paper_delta": _num(c.paper_delta) if c else "", "verdict": c.verdict if c else "",
            })
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# entry points
# ----------------------------------------------------------------------------------------------
_RENDERERS = {"md": render_markdown, "latex": render_latex, "csv": render_csv}


def render(table: Any, fmt: str = "md") -> str:
    try:
        return _RENDERERS[fmt](table)
    except KeyError:
        raise ConfigError(f"unknown table format '{fmt}' (expected one of {', '.join(FORMATS)})") from None


def write_tables(report: Any, out_dir: Any, formats: Sequence[str] = FORMATS) -> List[Path]:
    """``<out_dir>/<suite>/table<N>.<ext>`` for each table and format, written atomically."""
    written: List[Path] = []
    for table in report.tables:
        for fmt in formats:
            path = Path(out_dir) / table.suite / f"table{table.number}.{EXTENSIONS[fmt]}"
            atomic_write_text(path, render(table, fmt))
            written.append(path)
    return written
