"""The demo's building blocks: scene-retrieval rate, dataset reuse, run specs, the report's registry."""
import json
import os

import pytest

from maps.demo import (DEMO_EXPERIMENTS, QUICK, DemoSize, configure_environment, demo_registry,
                       drop_stale_products, ensure_dataset, memory_spec, refuse_unjudgeable,
                       resized_experiment,
                       run_specs, same_scene_rate, scenes_of)
from maps.data.synthetic import dataset_fingerprint
from maps.errors import DatasetError
from maps.io import NotMadeByMapsError, make_dir
from maps.registry import load_registry


def _cache(path, rows):
    header = {"format": "maps-neighbors", "version": 1, "k": 2}
    lines = [json.dumps(header)] + [
        json.dumps({"image_id": q, "neighbors": nn, "scores": [1.0 - 0.1 * i for i in range(len(nn))]})
        for q, nn in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_same_scene_rate_counts_hits_and_chance(tmp_path):
    # memory: 3 kitchens (1, 2, 3), 1 street (4); queries 10 (kitchen) and 11 (street)
    memory = {1: "kitchen", 2: "kitchen", 3: "kitchen", 4: "street"}
    queries = {10: "kitchen", 11: "street"}
    cache = _cache(tmp_path / "nb.jsonl", [(10, [1, 4]), (11, [4, 2])])
    r = same_scene_rate(cache, queries, memory)
    assert r.rate == pytest.approx(2 / 4)  # 10: 1 hit of 2; 11: 1 hit of 2
    assert r.chance == pytest.approx((3 / 4 + 1 / 4) / 2)
    assert (r.queries, r.k) == (2, 2)
    assert "50.0%" in r.describe() and "chance 50.0%" in r.describe()
    # only the first k neighbours count
    assert same_scene_rate(cache, queries, memory, k=1).rate == pytest.approx(1.0)


def test_same_scene_rate_excludes_the_query_from_chance_when_it_is_in_memory(tmp_path):
    memory = {1: "lake", 2: "lake", 3: "forest"}
    cache = _cache(tmp_path / "nb.jsonl", [(1, [2, 3])])
    r = same_scene_rate(cache, memory, memory)
    assert r.rate == pytest.approx(0.5)
    assert r.chance == pytest.approx(1 / 2)  # the other lake of the 2 other images


def test_same_scene_rate_names_an_unknown_neighbour(tmp_path):
    cache = _cache(tmp_path / "nb.jsonl", [(10, [99])])
    with pytest.raises(DatasetError, match="neighbour 99 is not in the memory dataset"):
        same_scene_rate(cache, {10: "lake"}, {1: "lake"})


def test_scenes_of_reads_the_images_scene_field(tmp_path):
    (tmp_path / "panoptic_val.json").write_text(json.dumps({"images": [{"id": 5, "scene": "lake"}]}))
    assert scenes_of(tmp_path, "val") == {5: "lake"}
    (tmp_path / "panoptic_train.json").write_text(json.dumps({"images": [{"id": 5}]}))
    with pytest.raises(DatasetError, match=r"panoptic_train.json: images \[5\] have no 'scene'"):
        scenes_of(tmp_path, "train")


def test_ensure_dataset_generates_then_reuses_then_regenerates_on_new_sizes(tmp_path):
    size = DemoSize(train_images=3, val_images=2, iterations=2)
    root, made = ensure_dataset(tmp_path / "synthetic", size, progress=False)
    assert made and len(scenes_of(root, "train")) == 3 and len(scenes_of(root, "val")) == 2
    assert ensure_dataset(root, size, progress=False) == (root, False)
    root, made = ensure_dataset(root, DemoSize(4, 2, 2), progress=False)
    assert made and len(scenes_of(root, "train")) == 4


def test_dataset_of_an_older_format_is_redrawn_and_what_was_built_from_it_dropped(tmp_path):
    """Stale products are found by the dataset fingerprint their markers recorded; only the
    demo's own folders are judged, and nothing else under the runs root is touched."""
    size = DemoSize(train_images=3, val_images=2, iterations=2)
    root, _ = ensure_dataset(tmp_path / "datasets/synthetic", size, progress=False)
    old = "fingerprint-of-v1"  # what products of the version-1 dataset recorded
    manifest = json.loads((root / "maps_synthetic.json").read_text())
    (root / "maps_synthetic.json").write_text(json.dumps({**manifest, "version": 1}))
    memory, run, other = tmp_path / "_memory/m", tmp_path / "synthetic/main/maps/seed0", tmp_path / "synthetic/x/seed0"
    for folder, kind in ((memory, "memory"), (run, "run"), (other, "run")):
        make_dir(folder, kind, dataset_fingerprint=old)
        (folder / "final.json").write_text("{}")
    keep = tmp_path / "notes.txt"
    keep.write_text("mine")
    root, made = ensure_dataset(root, size, progress=False)
    assert made and json.loads((root / "maps_synthetic.json").read_text())["version"] == manifest["version"]
    new = dataset_fingerprint(root)
    current = tmp_path / "synthetic/main/maps/seed1"
    make_dir(current, "run", dataset_fingerprint=new)
    said = []
    removed = drop_stale_products([(memory, "memory"), (run, "run"), (current, "run")], new, said.append)
    assert removed == [memory, run] and not memory.exists() and not run.exists()
    assert current.is_dir() and (other / "final.json").is_file()  # not the demo's: not judged
    assert keep.read_text() == "mine" and (root / "maps_synthetic.json").is_file()
    assert len(said) == 2 and all("the dataset changed: removing" in line for line in said)


def test_products_without_a_fingerprint_are_kept_and_refused_when_the_dataset_changed(tmp_path):
    unmarked = tmp_path / "synthetic/main/maps/seed0"
    unmarked.mkdir(parents=True)
    (unmarked / "final.json").write_text("{}")
    assert drop_stale_products([(unmarked, "run")], "f1", say=print) == []
    with pytest.raises(NotMadeByMapsError, match=r"seed0 may be built from the previous dataset, but has "
                                                 r"no maps marker .*not deleting it"):
        refuse_unjudgeable([(unmarked, "run")])
    assert (unmarked / "final.json").is_file()
    # the demo asks before it replaces the dataset: refused, the old dataset stays as it was
    size = DemoSize(train_images=3, val_images=2, iterations=2)
    root, _ = ensure_dataset(tmp_path / "datasets/synthetic", size, progress=False)
    before = (root / "maps_synthetic.json").read_text()
    with pytest.raises(NotMadeByMapsError):
        ensure_dataset(root, DemoSize(4, 2, 2), progress=False,
                       before_regenerating=lambda: refuse_unjudgeable([(unmarked, "run")]))
    assert (root / "maps_synthetic.json").read_text() == before


def test_existing_unmarked_dataset_is_not_overwritten(tmp_path):
    users = tmp_path / "datasets/synthetic"
    users.mkdir(parents=True)
    (users / "panoptic_train.json").write_text("{}")
    with pytest.raises(DatasetError, match="has no maps dataset marker"):
        ensure_dataset(users, DemoSize(3, 2, 2), progress=False)
    assert (users / "panoptic_train.json").read_text() == "{}"


def test_configure_environment_sets_one_thread_and_offline_wandb(tmp_path, monkeypatch):
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "DETECTRON2_DATASETS", "WANDB_SILENT"):
        monkeypatch.setenv(key, "x")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    env = configure_environment(tmp_path / "d")
    assert os.environ["OMP_NUM_THREADS"] == "1" and env["WANDB_MODE"] == "offline"
    assert os.environ["DETECTRON2_DATASETS"] == str((tmp_path / "d").absolute())
    monkeypatch.setenv("WANDB_MODE", "disabled")  # a user's choice is kept
    assert configure_environment(tmp_path / "d")["WANDB_MODE"] == "disabled"


@pytest.fixture(scope="module")
def registry():
    return load_registry()


def test_run_specs_shorten_the_schedule_and_attach_the_memory(registry, tmp_path):
    from maps.launch.memory_jobs import memory_prereq

    exps = [registry.get(n) for n in DEMO_EXPERIMENTS]
    spec = memory_spec(exps)
    assert spec["dataset"] == "synthetic_train" and spec["key_arch"] == "ViT-Tiny-16"
    prereq = memory_prereq(spec, tmp_path, str(tmp_path / "data"))
    size = DemoSize(10, 5, iterations=20, seeds=(0, 1), evals=2)
    specs = run_specs(exps, size, prereq)
    assert [(s.experiment, s.seed) for s in specs] == [(n, seed) for n in DEMO_EXPERIMENTS for seed in (0, 1)]
    for s in specs:
        cfg = s.config
        assert cfg.SOLVER.MAX_ITER == 20 and cfg.TEST.EVAL_PERIOD == 10
        assert all(step < 20 for step in cfg.SOLVER.STEPS)  # 1800/2000*20 = 18 kept, 19 kept
        if cfg.MODEL.MAPS.ENABLED:
            assert cfg.MODEL.MAPS.MEMORY.BANK == os.path.join(prereq.output_dir, "bank")
            assert list(s.prerequisites) == [prereq]
        else:
            assert s.experiment == "synthetic/main/mask2former" and not s.prerequisites


def test_run_specs_drop_lr_steps_that_land_on_the_last_iteration(registry):
    import dataclasses

    exp = registry.get("synthetic/main/mask2former")
    exp = dataclasses.replace(exp, overrides={**exp.overrides, "SOLVER.STEPS": [5, 10]})
    assert tuple(resized_experiment(exp, 10).build_config().SOLVER.STEPS) == (5, 10)  # refused by d2
    (spec,) = run_specs([exp], DemoSize(4, 2, iterations=10), None)
    assert tuple(spec.config.SOLVER.STEPS) == (5,)


def test_demo_registry_counts_the_demo_seeds(registry):
    small = demo_registry(registry, (0,), QUICK.iterations)
    assert small.get("synthetic/main/maps").seeds == (0,)
    assert small.get("synthetic/main/maps").iterations == QUICK.iterations
    assert registry.get("synthetic/main/maps").seeds == (0, 1, 2)  # the original is untouched
    paper = [e for e in registry if e.suite == "paper" and e.runnable][0]
    assert small.get(paper.name).seeds == paper.seeds


def _gain_table(maps_pq, base_pq):
    """A synthetic Table 2 with MAPS and its Mask2Former baseline, PQ per seed."""
    from maps.report import Cell, Comparison, Row, Table, welch_test

    base = Row("synthetic/main/mask2former", "Mask2Former", True, "m2f",
               {"PQ": Cell("PQ", dict(enumerate(base_pq)))}, is_baseline=True)
    cell = Cell("PQ", dict(enumerate(maps_pq)))
    t, dof, p, _ = welch_test(maps_pq, base_pq)
    cell.comparison = Comparison("synthetic/main/mask2former", cell.mean - base.cells["PQ"].mean,
                                 t=t, dof=dof, p_value=p)
    mine = Row("synthetic/main/maps", "MAPS", True, "maps", {"PQ": cell})
    return Table(2, "synthetic", "t", ("PQ",), (), [base, mine], base.name, "test")


def test_the_demo_states_its_result_in_one_sentence():
    from maps.demo import memory_verdict

    assert memory_verdict(_gain_table([47.0, 48.0, 47.5], [44.0, 44.5, 43.5])) == (
        "MAPS beats Mask2Former by +3.50 PQ over 3 seeds each (Welch p = 0.00102): "
        "significant at 0.05")
    assert memory_verdict(_gain_table([45.0, 43.0, 46.0], [44.0, 45.5, 43.5])).endswith(
        "not significant at 0.05")
    assert memory_verdict(_gain_table([43.0, 44.0], [45.0, 46.0])).startswith(
        "MAPS trails Mask2Former by -2.00 PQ over 2 seeds each")
    assert memory_verdict(_gain_table([47.0], [44.0])).endswith("too few seeds for a significance test")


def test_the_demo_trains_seed_by_seed():
    from types import SimpleNamespace

    from maps.demo import seed_major

    specs = [SimpleNamespace(experiment=e, seed=s) for e in ("m2f", "maps") for s in (0, 1, 2)]
    assert [(s.experiment, s.seed) for s in seed_major(specs)] == [
        ("m2f", 0), ("maps", 0), ("m2f", 1), ("maps", 1), ("m2f", 2), ("maps", 2)]


def test_same_place_rate_counts_the_queries_that_show_a_place(tmp_path):
    from maps.demo import places_of, same_place_rate

    # memory of 6 images: 1-2 at street-0, 3 at lake-1, 4-6 kitchens (no place)
    memory = {1: "street-0", 2: "street-0", 3: "lake-1"}
    cache = _cache(tmp_path / "nb.jsonl", [(10, [1, 3]), (11, [3, 4]), (12, [4, 5])])
    r = same_place_rate(cache, {10: "street-0", 11: "lake-1"}, memory, memory_size=6)
    assert r.rate == pytest.approx(2 / 4) and r.queries == 2  # the kitchen query 12 is left out
    assert r.chance == pytest.approx((2 / 6 + 1 / 6) / 2)
    assert same_place_rate(cache, {12: None}, memory, memory_size=6) is None
    (tmp_path / "panoptic_val.json").write_text(json.dumps(
        {"images": [{"id": 5, "scene": "lake", "place": "lake-1"}, {"id": 6, "scene": "kitchen"}]}))
    assert places_of(tmp_path, "val") == {5: "lake-1"}
