"""Cluster profiles: the shipped ones load, and every mistake names the file and the key."""
from pathlib import Path

import pytest

from maps.errors import ConfigError
from maps.launch import ClusterProfile, load_profile, make_executor

PROFILES = Path(__file__).resolve().parents[2] / "slurm" / "profiles"


def test_shipped_profiles_load():
    ci = load_profile(PROFILES / "local-ci.yaml")
    assert (ci.partition, ci.gpus_per_node, ci.ntasks_per_node, ci.timeout_min) == ("debug", 0, 1, 30)
    a100 = load_profile(PROFILES / "a100.yaml")
    # one process per GPU
    assert (a100.gpus_per_node, a100.ntasks_per_node, a100.world_size) == (8, 8, 8)
    h100 = load_profile(PROFILES / "h100.yaml")
    assert (h100.nodes, h100.ntasks_per_node, h100.world_size) == (2, 4, 8)
    assert h100.setup[0] == "module load cuda/12.4"
    assert h100.resources()["tasks_per_node"] == 4


def _write(tmp_path, text):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, message", [
    ("partition: gpu\ngpu_per_node: 2\n", r"p.yaml: unknown key 'gpu_per_node'"),
    ("nodes: two\n", r"p.yaml: key 'nodes' must be int, got 'two'"),
    ("nodes: 0\n", r"p.yaml: key 'nodes' must be >= 1, got 0"),
    ("timeout_min: true\n", r"p.yaml: key 'timeout_min' must be int"),
    ("setup: [1, 2]\n", r"p.yaml: key 'setup' must be a list of shell lines"),
    ("gpus_per_node: 4\ntasks_per_node: 2\n", r"p.yaml: key 'tasks_per_node' is 2 but gpus_per_node is 4"),
    ("additional_parameters: {dependency: afterok:1}\n", r"p.yaml: key 'additional_parameters' may not set \['dependency'\]"),
    ("- a\n- b\n", r"p.yaml: a cluster profile is a mapping"),
    ("partition: [\n", r"p.yaml: not valid YAML"),
])
def test_profile_errors_name_file_and_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_profile(_write(tmp_path, text))


def test_missing_profile(tmp_path):
    with pytest.raises(ConfigError, match=r"nope.yaml: cluster profile not found"):
        load_profile(tmp_path / "nope.yaml")


def test_no_profile_means_defaults():
    p = load_profile(None)
    assert p == ClusterProfile() and p.world_size == 1


def test_local_executor_gets_tasks_and_timeout(tmp_path):
    prof = ClusterProfile(tasks_per_node=2, timeout_min=7)
    ex = make_executor("local", tmp_path / "%j", prof, "maps-x")
    assert ex.parameters["tasks_per_node"] == 2 and ex.parameters["timeout_min"] == 7


# -- the schema: new fields, control characters, status records, --set ---------------------------
@pytest.mark.parametrize("text, message", [
    ('setup: ["module load x", "export A=1\\nrm -rf ~"]\n',
     r"p.yaml: key 'setup\[1\]' must not contain a control character \('\\n'"),
    ('partition: "gpu\\r"\n', r"p.yaml: key 'partition' must not contain a control character"),
    ('srun_args: ["--cpu-bind=none\\0"]\n', r"p.yaml: key 'srun_args\[0\]' must not contain"),
    ('sbatch_args: {mail-user: "me\\n#SBATCH --x"}\n', r"p.yaml: key 'sbatch_args.mail-user' must not contain"),
    ('sbatch_args: {"x\\ny": 1}\n', r"p.yaml: key 'sbatch_args': 'x\\ny' is not an sbatch option name"),
    ('additional_parameters: {"mail-user": "a\\tb"}\n', r"key 'additional_parameters.mail-user' must not contain"),
    ("signal_delay_s: 0\n", r"p.yaml: key 'signal_delay_s' must be >= 1, got 0"),
    ("timeout_min: 30\nsignal_delay_s: 1800\n", r"key 'signal_delay_s' is 1800 s, not shorter than the time limit"),
    ("max_num_timeout: -1\n", r"p.yaml: key 'max_num_timeout' must be >= 0"),
    ("exclusive: 1\n", r"p.yaml: key 'exclusive' must be true or false, got 1"),
    ("srun_args: --cpu-bind=none\n", r"p.yaml: key 'srun_args' must be a list of srun arguments"),
    ("sbatch_args: {time: 5}\n", r"p.yaml: key 'sbatch_args' may not set \['time'\]"),
    ("sbatch_args: {requeue: false}\n", r"key 'sbatch_args.requeue' must be text, a number or true"),
    ("sbatch_args: {requeue: true}\nadditional_parameters: {requeue: true}\n", r"'requeue'\] also set in additional_parameters"),
    ("account: ''\n", r"p.yaml: key 'account' must not be empty"),
    ("mem_gb: -1\n", r"p.yaml: key 'mem_gb' must be >= 0"),
])
def test_profile_schema_refuses_before_anything_is_written(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_profile(_write(tmp_path, text))
    assert "\n" not in str(info.value).replace("\\n", "")


def test_new_profile_fields_have_the_old_defaults(tmp_path):
    p = load_profile(_write(tmp_path, "partition: gpu\naccount: null\n"))
    assert (p.signal_delay_s, p.max_num_timeout, p.exclusive, p.srun_args, p.sbatch_args) == (120, 3, False, (), {})
    assert p.account is None and p.source == str(tmp_path / "p.yaml")
    assert ClusterProfile(timeout_min=5).replace(nodes=2).nodes == 2


def test_status_records_keep_a_hash_of_the_setup_not_its_lines():
    import hashlib
    import json

    lines = ("module load cuda/12.4", "export WANDB_API_KEY=not-for-records")
    res = ClusterProfile(setup=lines).resources()
    assert "setup" not in res and "not-for-records" not in json.dumps(res)
    assert res["setup_lines"] == 2
    assert res["setup_sha256"] == hashlib.sha256("\n".join(lines).encode()).hexdigest()
    assert ClusterProfile().resources()["setup_lines"] == 0


def test_launch_records_no_setup_lines(tmp_path):
    import json

    from maps.launch import RunSpec, RunStore, launch

    store = RunStore(tmp_path / "runs")
    prof = ClusterProfile(setup=("export TOKEN=s3cret",))
    spec = RunSpec("toy/a", 0, json.dumps({"TOY": {"STEPS": 1}, "SOLVER": {"IMS_PER_BATCH": 8}}),
                   "maps_toy_tasks:toy_train")
    report = launch([spec], "debug", profile=prof, store=store)
    status = (store.run_dir("toy/a", 0) / "status.json").read_text()
    assert "s3cret" not in status and json.loads(status)["resources"]["setup_lines"] == 1
    assert "s3cret" not in json.dumps(report.resources)


def test_profile_overrides_from_the_command_line():
    from maps.launch.profiles import apply_profile_overrides

    base = load_profile(PROFILES / "a100.yaml")
    p = apply_profile_overrides(base, {"timeout_min": "60", "account": "null", "exclusive": "true",
                                       "srun_args": "[--cpu-bind=none]", "qos": "high"})
    assert (p.timeout_min, p.account, p.exclusive, p.srun_args, p.qos) == (60, None, True, ("--cpu-bind=none",), "high")
    assert p.setup == base.setup and p.gpus_per_node == 8
    assert "a100.yaml" in p.source and "profile.timeout_min" in p.source
    assert apply_profile_overrides(base, {}) == base
    for sets, message in [({"timeout_min": "0"}, "key 'profile.timeout_min' must be >= 1, got 0"),
                          ({"timeot_min": "5"}, "unknown key 'profile.timeot_min' (did you mean 'profile.timeout_min'?)"),
                          ({"partition": "gpu\nrm"}, "key 'profile.partition' must not contain a control character"),
                          ({"tasks_per_node": "3"}, "key 'profile.tasks_per_node' is 3 but gpus_per_node is 8"),
                          ({"nodes": "two"}, "key 'profile.nodes' must be int, got 'two'")]:
        with pytest.raises(ConfigError) as info:
            apply_profile_overrides(base, sets)
        assert message in str(info.value) and "a100.yaml" in str(info.value)


def test_slurm_script_takes_the_new_profile_fields(tmp_path, monkeypatch):
    """The sbatch text submitit writes, without a Slurm client (srun/sbatch checks stubbed)."""
    import submitit

    import maps.launch.executors as executors

    monkeypatch.setattr(executors, "slurm_available", lambda: True)
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", staticmethod(lambda: 1))
    prof = ClusterProfile(partition="gpu", account="acct", qos="high", constraint="a100", exclusive=True,
                          timeout_min=60, signal_delay_s=300, max_num_timeout=5,
                          srun_args=("--cpu-bind=none",), sbatch_args={"mail-user": "me@x.org"},
                          additional_parameters={"requeue": True}, setup=("module load cuda",))
    ex = make_executor("slurm", tmp_path / "%j", prof, "maps-t")
    assert ex.max_num_timeout == 5
    text = ex._make_submission_file_text("python -m x", "uid")
    for line in ["#SBATCH --signal=USR2@300", "#SBATCH --exclusive", "#SBATCH --account=acct",
                 "#SBATCH --qos=high", "#SBATCH --constraint=a100", "#SBATCH --mail-user=me@x.org",
                 "#SBATCH --requeue", "module load cuda"]:
        assert line in text, line
    assert "--cpu-bind=none" in next(line for line in text.splitlines() if line.startswith("srun"))
    local = make_executor("local", tmp_path / "%j", prof, "maps-t")
    assert local.max_num_timeout == 5
