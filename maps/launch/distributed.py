"""torch.distributed inside a job: ranks from submitit's TorchDistributedEnvironment, process groups."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Optional

import submitit
import submitit.helpers


logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Distributed setup inside a job
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DistributedEnv:
    """Where this process sits in a job: what torch.distributed's env:// method needs."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    job_id: Optional[str] = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _port_for(job_id: str) -> int:
    """A port per job, the same on every task of it, so that jobs sharing a node don't clash."""
    digest = hashlib.sha1(job_id.encode()).digest()
    return 20000 + int.from_bytes(digest[:4], "big") % 30000


def distributed_env() -> DistributedEnv:
    """Where this process sits: submitit's ``TorchDistributedEnvironment`` inside a job (Slurm or
    local), else torchrun-style env vars (``RANK``, ``WORLD_SIZE``, ...).

    Inside a job, the master is the job's first host when it spans several nodes and loopback
    on one; ``MASTER_ADDR`` / ``MASTER_PORT`` in the environment win, else the port is derived
    from the job id (:func:`_port_for`), the same on every task of the job.
    """
    try:
        torch_env = submitit.helpers.TorchDistributedEnvironment()
    except RuntimeError:  # not inside a submitit job
        env = os.environ
        world = int(env.get("WORLD_SIZE", 1))
        return DistributedEnv(
            rank=int(env.get("RANK", 0)),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            world_size=world,
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", world)),
            node_rank=int(env.get("GROUP_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
        )
    job = submitit.JobEnvironment()
    job_id = str(job.job_id)
    multi_node = int(job.num_nodes) > 1
    return DistributedEnv(
        rank=int(torch_env.rank),
        local_rank=int(torch_env.local_rank),
        world_size=int(torch_env.world_size),
        local_world_size=max(int(torch_env.local_world_size), 1),
        node_rank=int(job.node),
        master_addr=os.environ.get("MASTER_ADDR") or (torch_env.master_addr if multi_node else "127.0.0.1"),
        master_port=int(os.environ.get("MASTER_PORT") or _port_for(job_id)),
        job_id=job_id,
    )


def init_distributed(env: Optional[DistributedEnv] = None, backend: Optional[str] = None,
                     timeout_s: float = 300.0) -> DistributedEnv:
    """Start torch.distributed for detectron2's ``comm`` (no-op for a single process).

    Exports MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK so libraries reading them agree,
    uses nccl on GPU and gloo on CPU, and creates detectron2's local process group (its
    ``get_local_rank`` needs it).
    """
    env = env or distributed_env()
    if env.world_size <= 1:
        return env
    import datetime

    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return env
    os.environ.update(
        MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port), RANK=str(env.rank),
        WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank),
        LOCAL_WORLD_SIZE=str(env.local_world_size),
    )
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group(
        backend=backend, init_method=f"tcp://{env.master_addr}:{env.master_port}",
        rank=env.rank, world_size=env.world_size, timeout=datetime.timedelta(seconds=timeout_s),
    )
    from detectron2.utils import comm

    if comm._LOCAL_PROCESS_GROUP is None:
        comm.create_local_process_group(env.local_world_size)
    return env


def teardown_distributed() -> None:
    import sys

    if "torch" not in sys.modules:  # never started: don't pay torch's import for nothing
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        from detectron2.utils import comm

        dist.destroy_process_group()
        comm._LOCAL_PROCESS_GROUP = None


