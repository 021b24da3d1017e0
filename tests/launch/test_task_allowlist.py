"""A task named by a file imports only maps' own modules, or those the operator names in
$MAPS_TASK_MODULES (issue 12): importing a module runs its code."""
import pytest

from maps.launch.specs import LaunchError, check_task, resolve_task


def test_maps_tasks_resolve():
    assert callable(resolve_task("maps.engine.train:run_training"))


@pytest.mark.parametrize("path", ["os:system", "shutil:rmtree", "subprocess:run", "mapsevil:run",
                                  "maps_toy_tasks_evil:x"])
def test_other_modules_are_refused_before_import(path, monkeypatch):
    monkeypatch.setenv("MAPS_TASK_MODULES", "maps_toy_tasks")
    with pytest.raises(LaunchError, match=r"sweeps/s\.yaml: key 'task': task .* is not maps' own"):
        resolve_task(path, "sweeps/s.yaml: key 'task'")


def test_operator_named_modules_resolve(monkeypatch):
    monkeypatch.setenv("MAPS_TASK_MODULES", " maps_toy_tasks , other")
    assert callable(resolve_task("maps_toy_tasks:toy_train"))
    monkeypatch.delenv("MAPS_TASK_MODULES")
    with pytest.raises(LaunchError, match="MAPS_TASK_MODULES"):
        check_task("maps_toy_tasks:toy_train")


@pytest.mark.parametrize("path", ["nocolon", ":f", "m:", 5])
def test_malformed_paths(path):
    with pytest.raises(LaunchError, match="expected 'package.module:function'"):
        check_task(path)
