"""maps.evaluation.pq against COCO's panopticapi, hotcoco, and numbers computed by hand."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest

from maps.errors import DatasetError, MapsError
from maps.evaluation.pq import PQStat, id2rgb, pq_compute, pq_image_stats, read_panoptic_png, rgb2id

from .panoptic_fixtures import CATEGORIES, make_generated_fixture, write_png

SEEDS = [0, 1, 2, 3]


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    return {s: make_generated_fixture(tmp_path_factory.mktemp(f"gen{s}"), seed=s) for s in SEEDS}


def _compute(paths, **kwargs):
    return pq_compute(paths["gt_json"], paths["gt_dir"], paths["pred_json"], paths["pred_dir"], **kwargs)


def _panopticapi_results(paths):
    """panopticapi's own per-image core (its pq_compute only adds a multiprocessing pool)."""
    from panopticapi.evaluation import pq_compute_single_core

    gt = json.loads(Path(paths["gt_json"]).read_text())
    pred = {a["image_id"]: a for a in json.loads(Path(paths["pred_json"]).read_text())["annotations"]}
    categories = {c["id"]: c for c in gt["categories"]}
    pairs = [(a, pred[a["image_id"]]) for a in gt["annotations"]]
    with contextlib.redirect_stdout(io.StringIO()):
        stat = pq_compute_single_core(0, pairs, str(paths["gt_dir"]), str(paths["pred_dir"]), categories)
    results = {}
    for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
        results[name], per_class = stat.pq_average(categories, isthing)
        if name == "All":
            results["per_class"] = per_class
    counts = {c: (stat[c].tp, stat[c].fp, stat[c].fn) for c in categories}
    return results, counts


def _hotcoco_results(paths):
    from hotcoco.panoptic import pq_compute as hotcoco_pq

    with contextlib.redirect_stdout(io.StringIO()):
        return hotcoco_pq(*(str(paths[k]) for k in ("gt_json", "pred_json", "gt_dir", "pred_dir")))


def _assert_close(ours, ref, tol=1e-9):
    for group in ("All", "Things", "Stuff"):
        assert ours[group]["n"] == ref[group]["n"], group
        for metric in ("pq", "sq", "rq"):
            assert ours[group][metric] == pytest.approx(ref[group][metric], abs=tol), (group, metric)
    for category_id, ref_class in ref["per_class"].items():
        for metric in ("pq", "sq", "rq"):
            mine = ours["per_class"][int(category_id)][metric]
            assert mine == pytest.approx(ref_class[metric], abs=tol), (category_id, metric)


@pytest.mark.parametrize("seed", SEEDS)
def test_agrees_with_panopticapi(generated, seed):
    paths = generated[seed]
    ours = _compute(paths)
    ref, counts = _panopticapi_results(paths)
    _assert_close(ours, ref)
    for category_id, (tp, fp, fn) in counts.items():
        mine = ours["per_class"][category_id]
        assert (mine["tp"], mine["fp"], mine["fn"]) == (tp, fp, fn), category_id
    assert 0 < ours["All"]["pq"] < 1  # a non-trivial fixture


@pytest.mark.parametrize("seed", SEEDS)
def test_agrees_with_hotcoco(generated, seed):
    paths = generated[seed]
    ours = _compute(paths)
    _assert_close(ours, _hotcoco_results(paths))


def test_generated_fixtures_exercise_void_crowd_and_three_channels(generated):
    """Guards the comparison above: the fixtures contain every special case of PQ."""
    high_ids = void_fp_ignored = crowd_fp_ignored = crowd_gt = 0
    for paths in generated.values():
        gt_json = json.loads(Path(paths["gt_json"]).read_text())
        pred_json = {a["image_id"]: a for a in _load(paths, "pred_json")["annotations"]}
        for gt_ann in gt_json["annotations"]:
            pred_ann = pred_json[gt_ann["image_id"]]
            gt = read_panoptic_png(Path(paths["gt_dir"]) / gt_ann["file_name"])
            pred = read_panoptic_png(Path(paths["pred_dir"]) / pred_ann["file_name"])
            high_ids += int((gt >= 65536).any() and (pred >= 65536).any())
            crowd = [s for s in gt_ann["segments_info"] if s["iscrowd"]]
            crowd_gt += len(crowd)
            for seg in pred_ann["segments_info"]:
                mask = pred == seg["id"]
                same = [c["id"] for c in crowd if c["category_id"] == seg["category_id"]]
                void_fp_ignored += int((gt[mask] == 0).mean() > 0.5)
                in_void, in_crowd = (gt[mask] == 0).mean(), np.isin(gt[mask], same).mean()
                crowd_fp_ignored += int(in_crowd > 0.5 and in_void <= 0.5)
    assert high_ids > 0 and crowd_gt > 0
    assert void_fp_ignored > 0 and crowd_fp_ignored > 0


# ---------------------------------------------------------------------------------------------
# Two 4x6 images computed by hand. Categories: person (1, thing), sky (2, stuff).
#
# Image 0, ground truth (S=1000 sky, P=70000 person, 0 void) and prediction
# (s=500 sky, p=300 person, 0 predicted void):
#     S S S S S S        s s s s s s
#     S S S S S S        s s s s s s
#     P P P 0 0 0        p p p p s s
#     P P P 0 0 0        p p 0 0 s s
#   S-s: inter 12, union = 16 + 12 - 12 - 4 (void in s) = 12      -> IoU 1     (sky tp)
#   P-p: inter 5,  union = 6 + 6 - 5 - 1 (void in p)   = 6        -> IoU 5/6   (person tp)
#
# Image 1, ground truth (S=1001 sky, A=65541 person, C=2000 person crowd) and prediction
# (s=600 sky, v=601 person, x=602 sky, q=603 person):
#     S S S S S 0        s s s s s v
#     S S S S S S        s s s s s s
#     A A C C C C        x x q q q q
#     A A C C C C        x x q q q q
#   S-s: inter 11, union 11 + 11 - 11 - 0 = 11                    -> IoU 1     (sky tp)
#   A: only overlapped by x, a sky segment                        -> person fn
#   x: unmatched sky, no void, no sky crowd                       -> sky fp
#   q: unmatched person, 8/8 in the person crowd C                -> ignored
#   v: unmatched person, 1/1 in void                              -> ignored
#
# sky:    tp 2, iou 2,   fp 1, fn 0: PQ 2/2.5 = 0.8, SQ 1,   RQ 0.8
# person: tp 1, iou 5/6, fp 0, fn 1: PQ (5/6)/1.5 = 5/9, SQ 5/6, RQ 2/3
# All: PQ (0.8 + 5/9)/2 = 61/90, SQ (1 + 5/6)/2 = 11/12, RQ (0.8 + 2/3)/2 = 11/15, n 2
# ---------------------------------------------------------------------------------------------
HAND_CATEGORIES = [
    {"id": 1, "name": "person", "isthing": 1},
    {"id": 2, "name": "sky", "isthing": 0},
]
GT0 = [[1000] * 6, [1000] * 6, [70000] * 3 + [0] * 3, [70000] * 3 + [0] * 3]
PRED0 = [[500] * 6, [500] * 6, [300] * 4 + [500] * 2, [300] * 2 + [0] * 2 + [500] * 2]
GT1 = [[1001] * 5 + [0], [1001] * 6, [65541] * 2 + [2000] * 4, [65541] * 2 + [2000] * 4]
PRED1 = [[600] * 5 + [601], [600] * 6, [602] * 2 + [603] * 4, [602] * 2 + [603] * 4]


def _write_hand_fixture(root: Path) -> dict:
    gt_anns = [
        {"image_id": 0, "file_name": "a.png", "segments_info": [
            {"id": 1000, "category_id": 2, "iscrowd": 0, "area": 12},
            {"id": 70000, "category_id": 1, "iscrowd": 0, "area": 6}]},
        {"image_id": 1, "file_name": "b.png", "segments_info": [
            {"id": 1001, "category_id": 2, "iscrowd": 0, "area": 11},
            {"id": 65541, "category_id": 1, "iscrowd": 0, "area": 4},
            {"id": 2000, "category_id": 1, "iscrowd": 1, "area": 8}]},
    ]
    pred_anns = [
        {"image_id": 0, "file_name": "a.png", "segments_info": [
            {"id": 500, "category_id": 2}, {"id": 300, "category_id": 1}]},
        {"image_id": 1, "file_name": "b.png", "segments_info": [
            {"id": 600, "category_id": 2}, {"id": 601, "category_id": 1},
            {"id": 602, "category_id": 2}, {"id": 603, "category_id": 1}]},
    ]
    for name, gt, pred in (("a.png", GT0, PRED0), ("b.png", GT1, PRED1)):
        write_png(root / "gt" / name, np.array(gt))
        write_png(root / "pred" / name, np.array(pred))
    (root / "gt.json").write_text(json.dumps({"annotations": gt_anns, "categories": HAND_CATEGORIES}))
    (root / "pred.json").write_text(json.dumps({"annotations": pred_anns}))
    return {"gt_json": root / "gt.json", "gt_dir": root / "gt",
            "pred_json": root / "pred.json", "pred_dir": root / "pred"}


@pytest.fixture
def hand(tmp_path):
    return _write_hand_fixture(tmp_path)


def test_hand_computed_two_images(hand):
    res = _compute(hand)
    assert res["All"] == pytest.approx({"pq": 61 / 90, "sq": 11 / 12, "rq": 11 / 15, "n": 2}, abs=1e-12)
    assert res["Things"] == pytest.approx({"pq": 5 / 9, "sq": 5 / 6, "rq": 2 / 3, "n": 1}, abs=1e-12)
    assert res["Stuff"] == pytest.approx({"pq": 0.8, "sq": 1.0, "rq": 0.8, "n": 1}, abs=1e-12)
    sky = {"pq": 0.8, "sq": 1.0, "rq": 0.8, "tp": 2, "fp": 1, "fn": 0}
    person = {"pq": 5 / 9, "sq": 5 / 6, "rq": 2 / 3, "tp": 1, "fp": 0, "fn": 1}
    assert res["per_class"][2] == pytest.approx(sky) and res["per_class"][1] == pytest.approx(person)
    # and the reference says the same
    ref, _ = _panopticapi_results(hand)
    _assert_close(res, ref)


def test_in_memory_stats_sum_to_the_file_result(hand):
    """pq_image_stats on arrays (what the training evaluator uses) adds up image by image."""
    cats = {c["id"]: c for c in HAND_CATEGORIES}
    gt_anns = json.loads(Path(hand["gt_json"]).read_text())["annotations"]
    pred_anns = json.loads(Path(hand["pred_json"]).read_text())["annotations"]
    stat = PQStat()
    for gt_ann, pred_ann, gt, pred in zip(gt_anns, pred_anns, (GT0, GT1), (PRED0, PRED1)):
        stat += pq_image_stats(
            np.array(gt), gt_ann["segments_info"], np.array(pred), pred_ann["segments_info"], cats
        )
    assert (stat[2].tp, stat[2].fp, stat[2].fn, stat[2].iou) == (2, 1, 0, 2.0)
    assert (stat[1].tp, stat[1].fp, stat[1].fn) == (1, 0, 1)
    assert stat[1].iou == pytest.approx(5 / 6)
    assert stat.pq_average(cats, None)["pq"] == pytest.approx(61 / 90)


def test_empty_group_reports_zero_with_n_zero():
    cats = {1: {"id": 1, "isthing": 1}}
    gt = np.full((2, 2), 300)
    stat = pq_image_stats(gt, [{"id": 300, "category_id": 1}], gt, [{"id": 300, "category_id": 1}], cats)
    assert stat.pq_average(cats, False) == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 0}
    assert stat.pq_average(cats, True) == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 1}


def test_ground_truth_area_without_json_area_is_the_pixel_count():
    cats = {1: {"id": 1, "isthing": 1}}
    gt = np.array([[300, 300, 300, 300]])
    pred = np.array([[7, 7, 7, 0]])
    stat = pq_image_stats(gt, [{"id": 300, "category_id": 1}], pred, [{"id": 7, "category_id": 1}], cats)
    assert stat[1].tp == 1 and stat[1].iou == pytest.approx(3 / 4)


def test_workers_give_the_same_result(generated):
    paths = generated[0]
    serial = _compute(paths)
    parallel = _compute(paths, num_workers=2)
    _assert_close(parallel, serial, tol=1e-12)


def test_rgb_round_trip_uses_all_three_channels():
    ids = np.array([[0, 255, 256], [65535, 65536, (1 << 24) - 1]])
    rgb = id2rgb(ids)
    assert rgb[1, 1].tolist() == [0, 0, 1] and rgb[0, 2].tolist() == [0, 1, 0]
    np.testing.assert_array_equal(rgb2id(rgb), ids)


# --------------------------------------------------------------------------- bad input


def _load(paths, key):
    return json.loads(Path(paths[key]).read_text())


def _run(paths, pred_json=None):
    return pq_compute(paths["gt_json"], paths["gt_dir"], pred_json or paths["pred_json"],
                      paths["pred_dir"])


def test_missing_prediction_png_names_the_file(hand):
    (Path(hand["pred_dir"]) / "b.png").unlink()
    with pytest.raises(DatasetError, match=r"panoptic PNG not found: .*pred/b\.png"):
        _run(hand)


def test_segment_in_png_missing_from_segments_info(hand):
    pred = _load(hand, "pred_json")
    pred["annotations"][1]["segments_info"] = pred["annotations"][1]["segments_info"][:3]  # drops 603
    with pytest.raises(DatasetError, match=r"b\.png.*segment id 603 is in the PNG but not in its"):
        _run(hand, pred)


def test_segments_info_id_missing_from_png(hand):
    pred = _load(hand, "pred_json")
    pred["annotations"][0]["segments_info"].append({"id": 123456, "category_id": 1})
    with pytest.raises(DatasetError, match=r"a\.png.*\[123456\] are not in the PNG"):
        _run(hand, pred)


def test_unknown_category(hand):
    pred = _load(hand, "pred_json")
    pred["annotations"][0]["segments_info"][0]["category_id"] = 99
    with pytest.raises(DatasetError, match=r"a\.png.*unknown category_id 99"):
        _run(hand, pred)


def test_mismatched_sizes_name_both_files(hand):
    write_png(Path(hand["pred_dir"]) / "a.png", np.array(PRED0)[:, :5])
    message = r"pred/a\.png is 5x4 but its ground truth .*gt/a\.png is 6x4"
    with pytest.raises(DatasetError, match=message):
        _run(hand)


def test_missing_image_prediction_and_missing_json(hand, tmp_path):
    pred = _load(hand, "pred_json")
    pred["annotations"] = pred["annotations"][:1]
    with pytest.raises(DatasetError, match=r"no prediction for image_id 1 \(ground truth b\.png\)"):
        _run(hand, pred)
    with pytest.raises(MapsError, match=r"prediction JSON not found: .*nope\.json"):
        _run(hand, tmp_path / "nope.json")


def test_categories_argument_overrides_the_json(hand):
    """Only the categories passed in are averaged; a prediction of any other is an error."""
    res = _compute(hand, categories=HAND_CATEGORIES)
    assert res["All"]["n"] == 2
    with pytest.raises(DatasetError, match="unknown category_id"):
        _compute(hand, categories=CATEGORIES[:1])


@pytest.mark.slow
def test_agrees_with_panopticapi_pq_compute_on_a_larger_set(tmp_path):
    """panopticapi's full entry point (its multiprocessing pool) on 40 larger images."""
    from panopticapi.evaluation import pq_compute as reference_pq_compute

    paths = make_generated_fixture(tmp_path, seed=11, n_images=40, size=(120, 160))
    ours = _compute(paths, num_workers=2)
    with contextlib.redirect_stdout(io.StringIO()):
        args = (str(paths[k]) for k in ("gt_json", "pred_json", "gt_dir", "pred_dir"))
        ref = reference_pq_compute(*args)
    _assert_close(ours, ref)
