import json
import os
import stat

import pytest

from maps.io import atomic_write_json, atomic_write_text


def test_atomic_write_replaces_whole_file_with_normal_permissions(tmp_path):
    p = tmp_path / "sub" / "record.json"
    atomic_write_json(p, {"a": 1})
    atomic_write_json(p, {"a": 2})
    assert json.loads(p.read_text()) == {"a": 2}
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask
    assert [f.name for f in p.parent.iterdir()] == ["record.json"]  # no temp files left


def test_crash_between_write_and_rename_keeps_the_old_file(tmp_path, monkeypatch):
    p = tmp_path / "record.json"
    atomic_write_text(p, "old")

    def crash(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        atomic_write_text(p, "new and longer")
    assert p.read_text() == "old"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["record.json"]
