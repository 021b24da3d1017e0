"""Markdown, LaTeX (booktabs) and CSV of a table: cell format, escaping, round trip."""
import csv
import io

import pytest

from maps.report import build_table, build_tables, render, write_tables
from maps.report.render import latex_escape
from maps.launch.runstore import RunStore

from .conftest import final_record, write_run


@pytest.fixture
def table5(tmp_path, registry):
    for seed, (a, b) in enumerate(zip([40.0, 41.0, 42.0], [40.4, 40.7, 41.0])):
        write_run(tmp_path, "ade20k/table5/input-masking", seed, "done", final_record(a, 27.4, 47.5))
        write_run(tmp_path, "ade20k/maps", seed, "done", final_record(b, 27.0 + seed, 47.0))
    write_run(tmp_path, "ade20k/table5/swapped", 0, "running")
    write_run(tmp_path, "ade20k/table5/random-sampling", 0, "failed")
    return build_table(registry, RunStore(tmp_path), 5, "paper")


def _md_row(md, label):
    return next(line for line in md.splitlines() if line.startswith(f"| {label}"))


def test_markdown_cells(table5):
    md = render(table5, "md")
    assert md.startswith("## Table 5: Ablation of augmentation strategies on ADE20K (paper suite)")
    assert "| Row | PQ | AP | mIoU | Runs |" in md
    base = _md_row(md, "None (baseline)")
    assert "[= ade20k/maps]" in base and "40.7 ± 0.3 (n=3)<br>paper 40.7, Δ +0.0" in base
    row = _md_row(md, "Input-Masking")
    # 41.0 vs 40.7: +0.3 (paper claims +0.6); p from Welch over the seeds
    assert "41.0 ± 1.0 (n=3)<br>paper 41.3, Δ -0.3<br>vs base +0.3, p=0.661, claim +0.6 ~" in row
    assert "| 3/3 done |" in row
    assert "— (running 1)<br>paper 39.6" in _md_row(md, "Swapped")
    assert "— (failed 1)" in _md_row(md, "Random-Sampling")
    assert "— (not launched 1)" in _md_row(md, "Layer-Masking")


def test_latex_is_booktabs_and_escaped(table5):
    tex = render(table5, "latex")
    for needle in (r"\toprule", r"\midrule", r"\bottomrule", r"\begin{tabular}{lrrrl}",
                   r"41.0$\pm$1.0\,{\scriptsize (3)}", r"{\scriptsize [41.3/-0.3; $\Delta_b$+0.3 p=0.661$\sim$]}"):
        assert needle in tex
    assert tex.count("{") == tex.count("}") and tex.count("$") % 2 == 0
    body = tex.split(r"\midrule")[1].strip()
    assert all(line.endswith(r"\\") for line in body.splitlines()[:5])


def test_latex_escape_of_specials():
    assert latex_escape("50% a_b & c#") == r"50\% a\_b \& c\#"
    assert latex_escape("Mask2Former† [6]") == r"Mask2Former$^\dagger$ [6]"


def test_latex_of_the_paper_tables_has_no_raw_specials(tmp_path, registry):
    report = build_tables(registry, RunStore(tmp_path), "all", "paper")
    for table in report.tables:
        tex = render(table, "latex")
        assert "†" not in tex and "±" not in tex and "✓" not in tex
        assert tex.count("{") == tex.count("}")
        width = 2 + len(table.extra_columns) + len(table.columns)
        body = tex.split(r"\midrule")[1].split(r"\bottomrule")[0].strip().splitlines()
        assert len(body) == len(table.rows)
        for line in body:  # '&' only as the column separator; % _ # only escaped
            assert line.replace(r"\&", "").count("&") == width - 1, line
            for ch in "%_#":
                assert ch not in line.replace("\\" + ch, ""), (ch, line)
    t6 = render(report.tables[5], "latex")
    assert r"TiledCLIP-Image" in t6 and r"$\checkmark$" in t6


def test_csv_round_trip(table5):
    rows = list(csv.DictReader(io.StringIO(render(table5, "csv"))))
    assert len(rows) == 5 * 3
    pq = next(r for r in rows if r["experiment"] == "ade20k/table5/input-masking" and r["metric"] == "PQ")
    assert float(pq["mean"]) == 41.0 and float(pq["std"]) == 1.0 and pq["n"] == "3"
    assert pq["values"] == "seed0=40.0;seed1=41.0;seed2=42.0"
    assert float(pq["paper"]) == 41.3 and pq["baseline"] == "ade20k/table5/none"
    assert float(pq["p_value"]) == pytest.approx(table5.row("ade20k/table5/input-masking").cells["PQ"].comparison.p_value, abs=1e-6)
    assert pq["verdict"] == "not significant"
    swapped = next(r for r in rows if r["experiment"] == "ade20k/table5/swapped" and r["metric"] == "PQ")
    assert swapped["state"] == "missing" and swapped["mean"] == "" and swapped["runs"] == "0/1 done; running 1"


def test_write_tables_atomically_into_suite_folders(tmp_path, table5):
    from maps.report import Report

    written = write_tables(Report([table5], []), tmp_path / "results")
    assert sorted(p.name for p in written) == ["table5.csv", "table5.md", "table5.tex"]
    assert (tmp_path / "results/paper/table5.md").read_text() == render(table5, "md")
    assert not list((tmp_path / "results/paper").glob(".*tmp"))


def test_markdown_sums_up_the_verdicts(table5):
    md = render(table5, "md")
    # PQ and AP of Input-Masking: p > 0.05; mIoU: zero variance on both sides, no test
    assert "Against the baseline: 2 not significant, 1 untested (of 3 row-metric pairs compared" in md


def test_reconstructed_paper_numbers_are_marked(tmp_path, registry):
    md = render(build_table(registry, RunStore(tmp_path), 7, "paper"), "md")
    row1 = _md_row(md, "1 |")
    assert "paper 22.2*" in row1 and "paper 40.3*" in row1
    row3 = _md_row(md, "3 |")
    assert "paper 34.1" in row3 and "*" not in row3
    assert "reconstructed from a garbled text extraction" in md
