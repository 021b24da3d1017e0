"""The sbatch script a profile produces. submitit's SlurmExecutor needs the Slurm client
binaries (srun) to exist, so this runs with the Slurm suite, not the fast one."""
from pathlib import Path

import pytest

from maps.launch import load_profile, make_executor

PROFILES = Path(__file__).resolve().parents[2] / "slurm" / "profiles"


@pytest.mark.slurm
def test_sbatch_script_has_profile_resources_and_dependency(tmp_path):
    ex = make_executor("slurm", tmp_path / "%j", load_profile(PROFILES / "a100.yaml"), "maps-t",
                       dependency="afterok:41:42")
    text = ex._make_submission_file_text("python -m x", "uid")
    for line in ["#SBATCH --partition=gpu", "#SBATCH --account=my-account", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --ntasks-per-node=8", "#SBATCH --cpus-per-task=10", "#SBATCH --time=1440",
                 "#SBATCH --dependency=afterok:41:42", "#SBATCH --kill-on-invalid-dep=yes", "#SBATCH --requeue", "#SBATCH --constraint=a100",
                 "#SBATCH --mem=491520M", "module load cuda/12.4"]:
        assert line in text, line
