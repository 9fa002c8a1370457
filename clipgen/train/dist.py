"""Distributed data parallel: who launched us (torchrun or SLURM's srun), the process group, rank-0-only work.

    torchrun --nproc_per_node=4 --no-python clipgen-train ...      RANK / WORLD_SIZE / LOCAL_RANK (+ MASTER_*)
    srun --ntasks-per-node=4 clipgen-train ...                     SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID

Under srun, the rendezvous address is the first host of the job's node list (``MASTER_ADDR`` wins when set) and
the port is derived from the job id (``MASTER_PORT`` wins when set), so every task of a job agrees without any
shared file. One process per device: NCCL on CUDA (device = local rank), gloo on CPU. A single task (plain
``python``/``clipgen-train``, or an sbatch script with one task) is not distributed at all.
"""
from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass

import torch

from clipgen.errors import ClipgenError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = "none"  # none | torchrun | slurm

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int(env: dict, key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise ClipgenError(f"environment variable {key}={env[key]!r}: expected an integer") from None


def _first_host(nodelist: str) -> str:
    """First host of a SLURM node list such as ``gpu[03-05,07],cpu1`` -> ``gpu03``."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    m = re.match(r"([^\[,]+)(?:\[([0-9]+))?", nodelist)  # without scontrol: parse the first entry
    if not m:
        raise ClipgenError(f"SLURM_JOB_NODELIST={nodelist!r}: cannot find the first host; set MASTER_ADDR")
    return m.group(1) + (m.group(2) or "")


def detect(env: dict | None = None) -> DistEnv:
    """The process's place in a job, from torchrun's or SLURM's environment."""
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(_int(env, "RANK"), _int(env, "WORLD_SIZE"), _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env
                       else 0, "torchrun")
    # A task started by srun has SLURM_STEP_NUM_TASKS; the batch script itself (one process, whatever --ntasks
    # says) does not, so it is never mistaken for rank 0 of a group whose other ranks do not exist.
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        world = _int(env, "SLURM_STEP_NUM_TASKS")
        if world > 1:
            return DistEnv(_int(env, "SLURM_PROCID"), world, _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env
                           else 0, "slurm")
    return DistEnv()


def init(denv: DistEnv, device: torch.device) -> torch.device:
    """Join the process group (a no-op for a single process); returns this process's device."""
    if not denv.distributed:
        return device
    import torch.distributed as dist

    if not 0 <= denv.rank < denv.world_size:
        raise ClipgenError(f"rank {denv.rank} of world size {denv.world_size} ({denv.launcher}): expected "
                           "0 <= rank < world size")
    if denv.launcher == "slurm":
        os.environ.setdefault("MASTER_ADDR", _first_host(os.environ.get("SLURM_JOB_NODELIST", "127.0.0.1")))
        os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))
    if device.type == "cuda":
        if denv.local_rank >= torch.cuda.device_count():
            raise ClipgenError(f"local rank {denv.local_rank} but only {torch.cuda.device_count()} CUDA devices: "
                               "expected one process per GPU (--nproc_per_node / --ntasks-per-node = GPUs)")
        device = torch.device("cuda", denv.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://",
                                rank=denv.rank, world_size=denv.world_size)
    return device


def barrier(denv: DistEnv) -> None:
    if denv.distributed:
        torch.distributed.barrier()


def all_mean_max(denv: DistEnv, mean: float, flag: float, device: torch.device) -> tuple[float, float]:
    """The mean of ``mean`` (NaN if any rank's is NaN) and the max of ``flag`` over all ranks."""
    if not denv.distributed:
        return mean, flag
    import torch.distributed as dist

    s = torch.tensor([mean], dtype=torch.float64, device=device)
    m = torch.tensor([flag], dtype=torch.float64, device=device)
    dist.all_reduce(s, op=dist.ReduceOp.SUM)
    dist.all_reduce(m, op=dist.ReduceOp.MAX)
    return float(s.item()) / denv.world_size, float(m.item())


def shutdown(denv: DistEnv) -> None:
    if denv.distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
