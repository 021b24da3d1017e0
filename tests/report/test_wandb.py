"""The W&B source, tested against RECORDED API responses (fixtures/wandb_runs.json).

No W&B cloud is reachable from the test machine: the fixture holds what
``wandb.Api().runs(path, filters)`` returns (name, id, tags, config, summary, state, and the
rows of ``scan_history``), replayed by RecordedWandbApi through the same adapter interface
that LiveWandbApi implements with wandb.Api. The run store built from the same runs must give
the same tables.
"""
import pytest

from maps.errors import MapsError
from maps.report import build_tables, render
from maps.report.sources import LiveWandbApi, RecordedWandbApi, WandbSource
from maps.launch.runstore import RunStore

from .conftest import WANDB_FIXTURE, store_from_wandb_fixture


def _body(md):
    """A rendered table without its 'Source:' legend line (which names the source)."""
    return "\n".join(line for line in md.splitlines() if not line.startswith("Source:"))


@pytest.fixture
def wandb_source():
    return WandbSource(RecordedWandbApi(WANDB_FIXTURE), "maps-lab", "maps-synthetic")


def test_wandb_and_run_store_give_the_same_tables(tmp_path, registry, wandb_source):
    store_from_wandb_fixture(tmp_path)
    from_wandb = build_tables(registry, wandb_source, "all", "synthetic")
    from_store = build_tables(registry, RunStore(tmp_path), "all", "synthetic")
    for a, b in zip(from_wandb.tables, from_store.tables):
        for fmt in ("md", "csv"):
            assert _body(render(a, fmt)) == _body(render(b, fmt))
    assert wandb_source.api.calls == [("maps-lab/maps-synthetic", {})]


def test_recorded_runs_give_the_known_numbers(registry, wandb_source):
    report = build_tables(registry, wandb_source, "all", "synthetic")
    main = report.tables[0]
    m2f, maps_row = main.row("synthetic/main/mask2former"), main.row("synthetic/main/maps")
    assert (m2f.cells["PQ"].mean, m2f.cells["PQ"].std, m2f.cells["PQ"].n) == (21.0, 1.0, 3)
    assert maps_row.cells["PQ"].mean == pytest.approx(25.1666667)
    t8 = next(t for t in report.tables if t.number == 8)
    k1, k10 = t8.row("synthetic/table8/k1"), t8.row("synthetic/table8/k10")
    assert k1.runs == {0: "done", 1: "done", 2: "failed"}            # W&B 'crashed'
    assert k10.runs == {0: "done", 1: "running", 2: "done"}           # seed 2 placed by OUTPUT_DIR
    assert k10.cells["PQ"].mean == 25.0
    swapped = next(t for t in report.tables if t.number == 5).row("synthetic/table5/swapped")
    assert swapped.runs[0] == "cancelled"                             # W&B 'killed'
    unplaced = [w for w in report.warnings if "no exp:/seed: tags" in w]
    assert len(unplaced) == 1 and "W&B maps-lab/maps-synthetic/" in unplaced[0]


def test_history_comes_from_scan_history(wandb_source, registry):
    wandb_source.index(e.canonical_name for e in registry if e.runnable)
    history = wandb_source.history("synthetic/main/maps", 0)
    evals = [h for h in history if "panoptic_seg/PQ" in h]
    assert [h["iteration"] for h in evals] == [499, 999]
    assert evals[-1]["panoptic_seg/PQ"] == 24.0 and "total_loss" in evals[-1]


class _FakeWandb:
    """Stands in for the wandb module: Api() raises what W&B raises in each situation."""

    def __init__(self, error):
        self.error = error
        self.timeouts = []

    def Api(self, timeout=None):
        self.timeouts.append(timeout)
        raise self.error


@pytest.mark.parametrize("error,hint", [
    ("usage", "no W&B API key"),
    ("timeout", "not reachable within 7s"),
])
def test_live_api_errors_become_one_line_maps_errors(monkeypatch, error, hint):
    import sys

    import wandb.errors

    exc = (wandb.errors.UsageError("api_key not configured (no-tty). call wandb.login(key=[your_api_key])")
           if error == "usage" else TimeoutError("Read timed out. (read timeout=7)"))
    fake = _FakeWandb(exc)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    with pytest.raises(MapsError) as info:
        LiveWandbApi(timeout=7).runs("maps-lab/maps")
    message = str(info.value)
    assert "\n" not in message and hint in message and "maps-lab/maps" in message
    assert fake.timeouts == [7]


def test_without_a_key_the_real_wandb_api_fails_as_a_maps_error(monkeypatch, tmp_path):
    """The real wandb.Api with no key and no netrc: UsageError at once, translated."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path))
    with pytest.raises(MapsError, match="W&B API for 'e/p'"):
        LiveWandbApi(timeout=2).runs("e/p")


def test_wandb_source_needs_a_project():
    with pytest.raises(MapsError, match="--project"):
        WandbSource(RecordedWandbApi([]), "e", "")


def test_summary_without_final_keys_uses_the_last_logged_evaluation(registry):
    """A run whose writer never called log_final: its summary holds detectron2's flat names."""
    run = {"id": "a1b2c3d4", "name": "maps", "entity": "e", "project": "p", "state": "finished",
           "tags": ["table:2", "exp:synthetic/main/maps", "seed:4"], "config": {},
           "summary": {"_step": 999, "panoptic_seg/PQ": 31.5, "panoptic_seg/PQ_th": 33.0,
                       "panoptic_seg/PQ_st": 30.0, "segm/AP": 15.0, "sem_seg/mIoU": 40.0,
                       "total_loss": 1.2}}
    source = WandbSource(RecordedWandbApi([run]), "e", "p")
    row = build_tables(registry, source, 2, "synthetic").tables[0].row("synthetic/main/maps")
    assert row.runs[4] == "done"
    assert {m: c.values.get(4) for m, c in row.cells.items()} == {
        "PQ": 31.5, "PQ_th": 33.0, "PQ_st": 30.0, "AP": 15.0, "mIoU": 40.0}
