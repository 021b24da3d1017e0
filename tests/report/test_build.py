"""Every table of both suites from generated run records with known means, stds and p-values.

Values are sample std (ddof=1); expected numbers are computed here with numpy and the Welch
formula, independently of maps.report.
"""
import math

import numpy as np
import pytest
from scipy import stats

from maps.report import BASELINES, build_table, build_tables
from maps.launch.runstore import RunStore

from .conftest import final_record, write_run

SEED_OFFSETS = (0.0, 1.0, 2.5)


def _values(i):
    """Three seeds of experiment number i: distinct means and spreads."""
    return [30.0 + 0.7 * i + (1 + 0.1 * i) * o for o in SEED_OFFSETS]


def _populate(root, registry, suite):
    """Three finished seeds for every distinct run of the suite; returns {run: PQ values}."""
    truth = {}
    for i, e in enumerate(x for x in registry if x.suite == suite and x.runnable and not x.same_as):
        pq = _values(i)
        truth[e.name] = pq
        for seed, v in enumerate(pq):
            write_run(root, e.name, seed, "done",
                      final_record(v, ap=v / 2, miou=v + 10, params=44.0 + i))
    return truth


def _welch_p(a, b):
    a, b = np.asarray(a), np.asarray(b)
    va, vb = a.var(ddof=1) / 3, b.var(ddof=1) / 3
    t = (a.mean() - b.mean()) / math.sqrt(va + vb)
    dof = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 2)
    return 2 * stats.t.sf(abs(t), dof)


@pytest.mark.parametrize("suite", ["paper", "synthetic"])
def test_every_table_has_known_means_stds_and_p_values(tmp_path, registry, suite):
    truth = _populate(tmp_path, registry, suite)
    report = build_tables(registry, RunStore(tmp_path), "all", suite)
    expected_tables = {"paper": [1, 2, 3, 4, 5, 6, 7, 8], "synthetic": [2, 4, 5, 6, 7, 8]}[suite]
    assert [t.number for t in report.tables] == expected_tables
    assert report.warnings == []
    for table in report.tables:
        base = table.row(BASELINES[suite][table.number])
        assert base.is_baseline
        for row in table.rows:
            e = registry.get(row.name)
            if not e.runnable:
                assert row.state == "reference" and all(c.n == 0 for c in row.cells.values())
                assert {m: c.paper for m, c in row.cells.items() if c.paper is not None} == \
                    {m: v for m, v in e.paper.items() if m in table.columns}
                continue
            pq = truth[e.canonical_name]
            cell = row.cells["PQ"]
            assert row.state == "done" and row.n_done == 3
            assert cell.n == 3
            assert cell.mean == pytest.approx(np.mean(pq))
            assert cell.std == pytest.approx(np.std(pq, ddof=1))
            assert row.cells["AP"].mean == pytest.approx(np.mean(pq) / 2)
            if suite == "paper":
                assert cell.paper == e.paper["PQ"]
                assert cell.diff == pytest.approx(np.mean(pq) - e.paper["PQ"])
            else:
                assert cell.paper is None and cell.diff is None
            if row.is_baseline or row.run_of == base.run_of:
                assert cell.comparison is None
                continue
            base_pq = truth[registry.get(base.name).canonical_name]
            c = cell.comparison
            assert c.delta == pytest.approx(np.mean(pq) - np.mean(base_pq))
            assert c.p_value == pytest.approx(_welch_p(pq, base_pq))


def test_table5_row_numbers_by_hand(tmp_path, registry):
    """Seeds 40, 41, 42 against the baseline's 39, 39.5, 40.5 (the None row is ade20k/maps)."""
    for seed, (a, b) in enumerate(zip([40.0, 41.0, 42.0], [39.0, 39.5, 40.5])):
        write_run(tmp_path, "ade20k/table5/input-masking", seed, "done", final_record(a, 27.0, 47.0))
        write_run(tmp_path, "ade20k/maps", seed, "done", final_record(b, 27.0, 47.0))
    table = build_table(registry, RunStore(tmp_path), 5, "paper")
    cell = table.row("ade20k/table5/input-masking").cells["PQ"]
    assert (cell.mean, cell.std, cell.n) == (41.0, 1.0, 3)
    assert cell.paper == 41.3 and cell.diff == pytest.approx(-0.3)
    c = cell.comparison
    assert c.baseline == "ade20k/table5/none"
    assert c.delta == pytest.approx(41.0 - 119.0 / 3)
    # t = 1.3333 / sqrt(1/3 + 0.58333/3) = 1.8353, Welch dof = 3.741
    assert c.t == pytest.approx(1.8353, abs=1e-3) and c.dof == pytest.approx(3.741, abs=1e-3)
    assert c.p_value == pytest.approx(2 * stats.t.sf(1.8353, 3.741), abs=1e-4)
    assert c.paper_delta == pytest.approx(41.3 - 40.7)
    assert c.verdict == "not significant"
    # AP equal everywhere: zero variance on both sides, no test
    assert table.row("ade20k/table5/input-masking").cells["AP"].comparison.p_value is None


def test_rows_without_finished_runs_say_what_is_missing(tmp_path, registry):
    write_run(tmp_path, "synthetic/table8/k1", 0, "queued")
    write_run(tmp_path, "synthetic/table8/k1", 1, "running")
    write_run(tmp_path, "synthetic/table8/k10", 0, "done", final_record(20.0, 10.0, 30.0))
    write_run(tmp_path, "synthetic/table8/k10", 1, "failed")
    write_run(tmp_path, "synthetic/table8/k10", 2, "cancelled")
    table = build_table(registry, RunStore(tmp_path), 8, "synthetic")
    k1, k5, k10 = (table.row(f"synthetic/table8/k{k}") for k in (1, 5, 10))
    assert k1.state == "missing" and k1.missing() == "queued 1, running 1, not launched 1"
    assert k5.state == "missing" and k5.missing() == "not launched 3" and k5.run_of == "synthetic/main/maps"
    assert k10.state == "partial" and k10.cells["PQ"].n == 1 and k10.cells["PQ"].mean == 20.0
    assert math.isnan(k10.cells["PQ"].std) and k10.cells["PQ"].comparison is None
    assert k10.missing() == "failed 1, cancelled 1"


def test_extra_seeds_in_the_store_count(tmp_path, registry):
    """The paper suite declares one seed; runs launched with --seeds 2 are used too."""
    for seed, v in enumerate([51.0, 52.0]):
        write_run(tmp_path, "coco/maps", seed, "done", final_record(v, 41.7, 62.1))
    row = build_table(registry, RunStore(tmp_path), 1, "paper").row("coco/maps")
    assert row.cells["PQ"].n == 2 and row.cells["PQ"].mean == 51.5 and row.runs == {0: "done", 1: "done"}


def test_params_and_iters_columns_come_from_final(tmp_path, registry):
    write_run(tmp_path, "cityscapes/maps", 0, "done", {**final_record(60.0, 34.0, 77.0), "iteration": 45000})
    row = build_table(registry, RunStore(tmp_path), 3, "paper").row("cityscapes/maps")
    assert row.cells["iters"].mean == 45000 and row.cells["iters"].paper == 45000
    write_run(tmp_path, "ade20k/table4/mask2former-6", 0, "done", final_record(40.0, 26.0, 46.0, params=45.7))
    row = build_table(registry, RunStore(tmp_path), 4, "paper").row("ade20k/table4/mask2former-6")
    assert row.cells["params"].mean == 45.7 and row.cells["params"].diff == pytest.approx(0.1)


def test_unknown_table_of_a_suite_is_a_clear_error(registry, tmp_path):
    from maps.errors import ConfigError
    from maps.report import table_numbers

    with pytest.raises(ConfigError, match="suite 'synthetic' has no table 1"):
        table_numbers(registry, "synthetic", 1)
    with pytest.raises(ConfigError, match="baseline 'nope' is not a row"):
        build_table(registry, RunStore(tmp_path), 5, "paper", baseline="nope")
