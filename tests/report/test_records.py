"""Bad run records are reported (run dir + problem) and skipped; they never stop the report."""
import json

from maps.report import build_tables
from maps.report.plots import metric_curve
from maps.launch.runstore import RunStore

from .conftest import final_record, write_run


def _broken_store(root):
    write_run(root, "synthetic/main/maps", 0, "done", final_record(24.0, 12.0, 33.0))
    write_run(root, "synthetic/main/maps", 1, "done", final_record(26.0, 13.0, 35.0))
    truncated = write_run(root, "synthetic/main/maps", 2, "done")
    (truncated / "final.json").write_text('{"PQ": 25.0, "AP"')           # killed mid-write
    no_ap = write_run(root, "synthetic/main/mask2former", 0, "done", {"PQ": 20.0, "PQ_th": 21.0,
                                                                      "PQ_st": 19.0, "mIoU": 30.0})
    nan_ap = write_run(root, "synthetic/main/mask2former", 1, "done", {**final_record(21.0, 0, 31.0)})
    (nan_ap / "final.json").write_text(json.dumps({**final_record(21.0, 0, 31.0), "AP": float("nan")}))
    no_final = write_run(root, "synthetic/main/mask2former", 2, "done")
    stale = write_run(root, "synthetic/main/old-name", 0, "done", final_record(1.0, 1.0, 1.0))
    bad_status = root / "synthetic/table8/k1/seed0"
    bad_status.mkdir(parents=True)
    (bad_status / "status.json").write_text('{"state": "runn')
    foreign = write_run(root, "synthetic/table8/k10", 0, "running")
    (foreign / "status.json").write_text(json.dumps({"experiment": "synthetic/table8/k1", "seed": 0,
                                                     "state": "done"}))
    return truncated, no_ap, nan_ap, no_final, stale, bad_status, foreign


def test_bad_records_are_warned_about_and_skipped(tmp_path, registry):
    truncated, no_ap, nan_ap, no_final, stale, bad_status, foreign = _broken_store(tmp_path)
    report = build_tables(registry, RunStore(tmp_path), "all", "synthetic")
    text = "\n".join(report.warnings)
    assert f"{truncated}: final.json: not valid JSON" in text
    assert f"{no_ap}: final metrics have no AP" in text
    assert f"{nan_ap}: final metrics have no AP" in text      # NaN: not evaluated
    assert f"{no_final}: state is done but final.json is missing" in text
    assert f"{stale}: experiment 'synthetic/main/old-name' is not in the registry" in text
    assert f"{bad_status}: status.json: not valid JSON" in text
    assert f"{foreign}: status.json: belongs to experiment 'synthetic/table8/k1'" in text
    assert len(report.warnings) == len(set(report.warnings))   # each once, not once per table

    main = report.tables[0]
    maps_row, m2f = main.row("synthetic/main/maps"), main.row("synthetic/main/mask2former")
    assert maps_row.runs == {0: "done", 1: "done", 2: "bad record"}
    assert maps_row.cells["PQ"].mean == 25.0 and maps_row.cells["PQ"].n == 2
    assert m2f.cells["PQ"].n == 2 and m2f.cells["AP"].n == 0   # PQ kept, AP skipped
    k1 = next(t for t in report.tables if t.number == 8).row("synthetic/table8/k1")
    assert k1.runs[0] == "bad record"
    # the table's own warnings (written under its Markdown) name its rows' bad records
    assert any(w.startswith(f"{truncated}: final.json: not valid JSON") for w in main.warnings)
    assert not any(str(bad_status) in w for w in main.warnings)


def test_metrics_history_dedupes_a_resume(tmp_path):
    """Iterations 199-299 were re-logged after a resume: the later lines win, once each."""
    run = write_run(tmp_path, "synthetic/main/maps", 0, "running", metrics=[
        {"iteration": 99, "panoptic_seg/PQ": 10.0},
        {"iteration": 199, "panoptic_seg/PQ": 11.0},
        {"iteration": 299, "panoptic_seg/PQ": 12.0},
        {"iteration": 199, "panoptic_seg/PQ": 11.5},
        {"iteration": 299, "panoptic_seg/PQ": 12.5},
        {"iteration": 399, "total_loss": 2.0},
    ])
    assert metric_curve(RunStore.read_metrics(run), "PQ") == ([99, 199, 299], [10.0, 11.5, 12.5])


def test_rows_trained_on_random_weights_say_so(tmp_path, registry):
    from maps.report import render

    write_run(tmp_path, "ade20k/maps", 0, "done", final_record(40.0, 27.0, 47.0))
    run = write_run(tmp_path, "ade20k/maps", 1, "done", final_record(41.0, 27.5, 47.5))
    status = json.loads((run / "status.json").read_text())
    status["random_weights"] = ["MODEL.WEIGHTS", "MODEL.MAPS.MEMORY.WEIGHTS"]
    (run / "status.json").write_text(json.dumps(status))
    table = build_tables(registry, RunStore(tmp_path), 2, "paper").tables[0]
    row = table.row("ade20k/maps")
    assert row.random_weights == {1: ("MODEL.WEIGHTS", "MODEL.MAPS.MEMORY.WEIGHTS")}
    assert "2/2 done; random weights (seed 1)" in row.runs_text()
    assert "random weights (seed 1)" in render(table, "md")
