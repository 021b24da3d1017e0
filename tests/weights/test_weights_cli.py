"""`maps weights list / add / verify / fetch`, and `maps train` refusing missing weights."""
from __future__ import annotations

import json
import pickle
import socket
import time

import pytest
from click.testing import CliRunner

from maps.cli import main

COCO_MAPS = "experiments/configs/coco/maps_R50_bs16_50ep.yaml"
TINY = "experiments/configs/synthetic/tiny.yaml"


def _run(*args: str):
    return CliRunner().invoke(main, list(args))


def _lines(text: str):
    return [line for line in text.splitlines() if line.strip()]


def test_list_names_every_weight_and_the_experiments_needing_it(cache):
    r = _run("weights", "list", "--json")
    assert r.exit_code == 0, r.output
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert set(rows) == {"r50-imagenet", "clip-vit-b16-openai", "dino-vit-b16"}
    for row in rows.values():
        assert not row["present"] and not row["verified"]
        assert row["path"].startswith(str(cache))
    assert {"coco/mask2former", "coco/maps", "ade20k/maps", "cityscapes/maps"} <= set(
        rows["r50-imagenet"]["experiments"])
    assert "coco/mask2former" not in rows["clip-vit-b16-openai"]["experiments"]
    assert "ade20k/table6/maskclip-image" in rows["clip-vit-b16-openai"]["experiments"]
    assert rows["clip-vit-b16-openai"]["activation"] == "quick_gelu"
    assert set(rows["dino-vit-b16"]["experiments"]) == {"ade20k/table6/dino-cls",
                                                        "ade20k/table6/dino-image"}
    assert not any(e.startswith("synthetic/") for row in rows.values() for e in row["experiments"])
    text = _run("weights", "list")
    assert text.exit_code == 0 and "r50-imagenet: missing" in text.output


def test_add_verifies_hashes_and_lists_a_file(cache, r50_pkl):
    from maps.io import file_sha256

    r = _run("weights", "add", "r50-imagenet", str(r50_pkl))
    assert r.exit_code == 0, r.output
    manifest = json.loads((cache / "r50-imagenet" / "manifest.json").read_text())
    assert manifest["sha256"] == file_sha256(r50_pkl) == file_sha256(
        cache / "r50-imagenet" / "r50-imagenet.pkl")
    assert manifest["verified"] and manifest["size"] == r50_pkl.stat().st_size
    assert {"name", "source", "time", "format"} <= set(manifest)
    assert sorted(p.name for p in (cache / "r50-imagenet").iterdir()) == [
        "manifest.json", "r50-imagenet.pkl"]  # no temporary left behind
    rows = {row["name"]: row for row in json.loads(_run("weights", "list", "--json").stdout)}
    assert rows["r50-imagenet"]["present"] and rows["r50-imagenet"]["verified"]
    r = _run("weights", "verify", "r50-imagenet")
    assert r.exit_code == 0 and "r50-imagenet: ok" in r.output


@pytest.mark.parametrize("name, make, why", [
    ("r50-imagenet", lambda p: p.write_bytes(pickle.dumps({"model": {"x": [1, 2]}})),
     "refused: the pickle calls|non-arrays"),
    ("r50-imagenet", lambda p: p.write_bytes(b"\x80\x04garbage"), "not a readable pickle"),
    ("clip-vit-b16-openai", lambda p: p.write_bytes(b"plain text"), "not a weights file"),
])
def test_add_refuses_a_bad_file_and_leaves_nothing(cache, tmp_path, name, make, why):
    bad = tmp_path / "bad.bin"
    make(bad)
    r = _run("weights", "add", name, str(bad))
    assert r.exit_code == 2
    (line,) = _lines(r.stderr)
    assert line.startswith(f"error: {bad}: refused as {name}: ")
    assert pytest.importorskip("re").search(why, line), line
    assert not (cache / name).exists()


def test_add_refuses_a_file_of_another_architecture_and_keeps_the_good_one(
        cache, r50_pkl, dino_file):
    assert _run("weights", "add", "r50-imagenet", str(r50_pkl)).exit_code == 0
    before = sorted((cache / "r50-imagenet").iterdir())
    r = _run("weights", "add", "r50-imagenet", str(dino_file))
    assert r.exit_code == 2 and "refused as r50-imagenet" in r.stderr
    r = _run("weights", "add", "dino-vit-b16", str(r50_pkl))
    assert r.exit_code == 2 and "refused as dino-vit-b16" in r.stderr
    assert sorted((cache / "r50-imagenet").iterdir()) == before
    assert not (cache / "dino-vit-b16").exists()
    assert _run("weights", "verify", "r50-imagenet").exit_code == 0


def test_verify_catches_a_changed_file(cache, r50_pkl):
    assert _run("weights", "add", "r50-imagenet", str(r50_pkl)).exit_code == 0
    cached = cache / "r50-imagenet" / "r50-imagenet.pkl"
    with open(cached, "ab") as f:
        f.write(b"\0")
    rows = {row["name"]: row for row in json.loads(_run("weights", "list", "--json").stdout)}
    assert rows["r50-imagenet"]["present"] and not rows["r50-imagenet"]["verified"]
    r = _run("weights", "verify")
    assert r.exit_code == 2
    (line,) = _lines(r.stderr)
    assert "r50-imagenet" in line and "the file changed" in line


def test_fetch_offline_fails_fast_with_one_line_per_weight(cache, monkeypatch):
    def no_dns(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    start = time.monotonic()
    r = _run("weights", "fetch")
    elapsed = time.monotonic() - start
    assert r.exit_code == 2
    lines = _lines(r.stderr)
    assert len(lines) == 3, lines
    for name, line in zip(("r50-imagenet", "clip-vit-b16-openai", "dino-vit-b16"), lines):
        assert line.startswith(f"error: cannot fetch {name} ")
        assert f"maps weights add {name} FILE" in line
    assert elapsed < 40, elapsed  # the hub alone retries for ~50 s per file when asked online
    assert not any(p.name.startswith(".fetch-") for p in cache.iterdir())
    r = _run("weights", "fetch", "r50-imagenett")
    assert r.exit_code == 2 and "did you mean 'r50-imagenet'" in r.stderr


def test_train_refuses_missing_weights_one_line_each_before_writing(cache, tmp_path):
    out = tmp_path / "run"
    r = _run("train", "--config", COCO_MAPS, "--output", str(out))
    assert r.exit_code == 2
    lines = _lines(r.stderr)
    assert len(lines) == 2, lines
    assert lines[0].startswith("error: MODEL.WEIGHTS r50-imagenet: not in the cache")
    assert "maps weights fetch r50-imagenet" in lines[0]
    assert "maps weights add r50-imagenet FILE" in lines[0]
    assert lines[1].startswith("error: MODEL.MAPS.MEMORY.WEIGHTS clip-vit-b16-openai")
    assert not out.exists()


def test_train_with_allow_random_weights_passes_the_check(cache, tmp_path, monkeypatch):
    import maps.engine.train as engine_train

    seen = {}

    def fake_train(cfg, resume=False, **kwargs):
        seen["cfg"] = cfg
        return {"PQ": 0.0}

    monkeypatch.setattr(engine_train, "train", fake_train)
    r = _run("train", "--config", COCO_MAPS, "--output", str(tmp_path / "run"),
             "--allow-random-weights")
    assert r.exit_code == 0, r.output
    cfg = seen["cfg"]
    assert cfg.MODEL.WEIGHTS == "" and cfg.MODEL.MAPS.MEMORY.WEIGHTS == ""
    # a wrong config is not forgiven: GELU CLIP with OpenAI's (QuickGELU) file
    r = _run("train", "--config", COCO_MAPS, "--output", str(tmp_path / "run2"),
             "--allow-random-weights", "MODEL.MAPS.MEMORY.KEY_ARCH", "ViT-B-16")
    assert r.exit_code == 2 and "set it to ViT-B-16-quickgelu" in r.stderr


def test_train_resolves_cached_weights_and_synthetic_needs_none(cache, tmp_path, monkeypatch,
                                                                r50_pkl):
    import maps.engine.train as engine_train

    seen = []
    monkeypatch.setattr(engine_train, "train", lambda cfg, **k: seen.append(cfg) or {})
    assert _run("weights", "add", "r50-imagenet", str(r50_pkl)).exit_code == 0
    r = _run("train", "--config", COCO_MAPS.replace("maps_", "maskformer2_"), "--output",
             str(tmp_path / "m2f"))
    assert r.exit_code == 0, r.output
    assert seen[-1].MODEL.WEIGHTS == str(cache / "r50-imagenet" / "r50-imagenet.pkl")
    r = _run("train", "--config", TINY, "--output", str(tmp_path / "tiny"))
    assert r.exit_code == 0, r.output
    assert seen[-1].MODEL.WEIGHTS == ""
