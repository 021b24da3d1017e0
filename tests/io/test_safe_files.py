"""maps deletes only the folders it made, reads the umask without changing it, and makes a
rename durable (issue 12)."""
import os
import stat

import pytest

import maps.io as mio
from maps.io import (
    MADE_MARKER,
    NotMadeByMapsError,
    atomic_write_text,
    made_by_maps,
    mark_made,
    remove_made,
)


def test_atomic_write_never_changes_the_process_umask(tmp_path, monkeypatch):
    """os.umask(0) then restore is a race: a thread creating a file in between gets mode 0666."""
    def forbidden(mask):
        raise AssertionError("os.umask called")

    monkeypatch.setattr(os, "umask", forbidden)
    atomic_write_text(tmp_path / "a.txt", "x")
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o666 & ~mio._IMPORT_UMASK


def test_atomic_write_fsyncs_the_folder_after_the_rename(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def spy(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    atomic_write_text(tmp_path / "a.txt", "x")
    assert synced == [False, True]  # the file's data, then the folder holding the new name


def test_marked_folder_is_removed(tmp_path):
    d = tmp_path / "made"
    d.mkdir()
    (d / "inner").mkdir()
    (d / "inner" / "f").write_text("x")
    mark_made(d, "run", experiment="e", seed=0)
    assert made_by_maps(d, "run") == {"made_by": "maps", "kind": "run", "experiment": "e", "seed": 0}
    assert made_by_maps(d, "dataset") is None
    assert remove_made(d, "run") is True
    assert not d.exists()
    assert remove_made(d, "run") is False  # nothing there: nothing to do


def test_facts_are_added_to_an_existing_marker(tmp_path):
    mark_made(tmp_path, "memory", dataset="a")
    mark_made(tmp_path, "memory", fingerprint="f")
    assert made_by_maps(tmp_path) == {"made_by": "maps", "kind": "memory", "dataset": "a", "fingerprint": "f"}


def test_unmarked_folder_is_refused_and_kept(tmp_path):
    d = tmp_path / "users"
    d.mkdir()
    (d / "weeks_of_work.pth").write_text("x")
    with pytest.raises(NotMadeByMapsError, match=r"users has no maps marker .*not deleting it; remove it "
                                                 r"yourself if it is stale"):
        remove_made(d, "run")
    assert (d / "weeks_of_work.pth").exists()


def test_folder_of_another_kind_is_refused(tmp_path):
    mark_made(tmp_path, "runstore")
    with pytest.raises(NotMadeByMapsError, match="as a 'runstore' folder, not a 'demo' one"):
        remove_made(tmp_path, "demo")
    assert (tmp_path / MADE_MARKER).exists()


def test_symlink_to_a_marked_folder_is_refused(tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    mark_made(target, "run")
    link = tmp_path / "link"
    link.symlink_to(target)
    assert made_by_maps(link) is None
    with pytest.raises(NotMadeByMapsError, match="symbolic link"):
        remove_made(link, "run")
    assert (target / MADE_MARKER).exists() and link.is_symlink()


def test_a_marker_file_that_is_not_maps_own_is_no_marker(tmp_path):
    (tmp_path / MADE_MARKER).write_text('{"kind": "run"}')
    assert made_by_maps(tmp_path) is None
    (tmp_path / MADE_MARKER).write_text("not json")
    with pytest.raises(NotMadeByMapsError):
        remove_made(tmp_path, "run")


def test_synthetic_overwrite_refuses_a_folder_maps_did_not_write(tmp_path):
    from maps.data.synthetic import generate_synthetic_dataset
    from maps.errors import DatasetError

    users = tmp_path / "ds"
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError, match="ds has no maps dataset marker"):
        generate_synthetic_dataset(users, 1, 1, 32, overwrite=True, progress=False)
    assert (users / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no temporary folder left
    afile = tmp_path / "f"
    afile.write_text("x")
    with pytest.raises(DatasetError, match="is a file"):
        generate_synthetic_dataset(afile, 1, 1, 32, overwrite=True, progress=False)


def test_synthetic_overwrite_replaces_its_own_dataset_and_an_empty_folder(tmp_path):
    from maps.data.synthetic import dataset_fingerprint, generate_synthetic_dataset

    empty = tmp_path / "empty"
    empty.mkdir()
    out = generate_synthetic_dataset(empty, 1, 1, 32, overwrite=True, progress=False)
    first = made_by_maps(out, "dataset")
    assert first["fingerprint"] == dataset_fingerprint(out)
    generate_synthetic_dataset(out, 2, 1, 32, overwrite=True, progress=False)
    assert made_by_maps(out, "dataset")["fingerprint"] != first["fingerprint"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_bank_writer_replaces_its_own_bank_and_refuses_a_users_folder(tmp_path):
    from maps.errors import MemoryBankError
    from maps.memory.bank import atomic_directory

    users = tmp_path / "users"
    users.mkdir()
    (users / "x").write_text("mine")
    with pytest.raises(MemoryBankError, match="users has no maps bank marker"):
        with atomic_directory(users) as tmp:
            (tmp / "a").write_text("new")
    assert (users / "x").read_text() == "mine" and sorted(tmp_path.iterdir()) == [users]

    bank = tmp_path / "bank"
    with atomic_directory(bank) as tmp:
        (tmp / "a").write_text("1")
        (tmp / "shards").mkdir()
    assert made_by_maps(bank, "bank")
    with atomic_directory(bank, keep=("shards",)) as tmp:
        (tmp / "a").write_text("2")
    assert (bank / "a").read_text() == "2" and (bank / "shards").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank", "users"]


def test_shards_folder_alone_is_replaced_by_the_bank(tmp_path):
    from maps.memory.bank import atomic_directory

    out = tmp_path / "bank"
    (out / "shards" / "s0").mkdir(parents=True)  # what shard jobs leave before the final write
    with atomic_directory(out, keep=("shards",)) as tmp:
        (tmp / "a").write_text("1")
    assert (out / "shards" / "s0").is_dir() and (out / "a").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank"]
