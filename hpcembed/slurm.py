"""Slurm: what a task learns from SLURM_* (in this one place), and `hpcembed launch`, the batch script's
signal-forwarding, requeueing wrapper around srun or mpiexec.

Only read here, never exported: srun reads SLURM_* variables as options, so a setting of ours named like one
would change the next step.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass

from .errors import EXIT_STOPPED, ConfigError

log = logging.getLogger("hpcembed")


def _int(env, name: str, default: int = 0) -> int:
    try:
        return int(env.get(name, default))
    except ValueError:
        return default


@dataclass(frozen=True)
class SlurmTask:
    ntasks: int                 # tasks in this step, every het component included
    node: str                   # the Slurm node name (fake nodes share a hostname, so not gethostname())
    gpus_on_node: int           # GPUs Slurm gave this job on this node
    het_group: int | None       # the het job component this task belongs to, in a het step

    @classmethod
    def from_environ(cls, env=None) -> "SlurmTask | None":
        """This task, when it runs inside a Slurm step (srun); None otherwise (including sbatch's batch shell)."""
        env = os.environ if env is None else env
        if "SLURM_STEP_ID" not in env or "SLURM_PROCID" not in env:
            return None
        procid = _int(env, "SLURM_PROCID")
        het_group = None
        if _int(env, "SLURM_HET_SIZE") > 1:
            # Ranks are numbered component by component; no variable names the task's own component.
            first = 0
            for group in range(_int(env, "SLURM_HET_SIZE")):
                first += _int(env, f"SLURM_NTASKS_HET_GROUP_{group}")
                if procid < first:
                    het_group = group
                    break
        gpus = _int(env, "SLURM_GPUS_ON_NODE")
        if not gpus and env.get("SLURM_JOB_GPUS"):
            gpus = len(env["SLURM_JOB_GPUS"].split(","))
        return cls(ntasks=_int(env, "SLURM_NTASKS", 1), node=env.get("SLURMD_NODENAME", ""), gpus_on_node=gpus,
                   het_group=het_group)

    def check_world(self, world_size: int) -> None:
        if self.ntasks != world_size:
            # A PMI mismatch starts N singletons that would each run the whole job.
            raise ConfigError(f"srun started {self.ntasks} tasks but this MPI world has {world_size} rank(s): the "
                              "MPI library and srun's --mpi plugin do not match (try srun --mpi=pmi2)")


FORWARDED = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)


def launch(command: list[str], requeue: bool = True) -> int:
    """Run the job step (`srun ... hpcembed run ...`) as a child and pass it the signals this batch shell gets:
    `sbatch --signal=B:USR1@120` signals only the batch shell. If the step exits with EXIT_STOPPED (stopped
    early, committed work kept), requeue this job so it resumes; any other exit code is passed on."""
    if not command:
        raise ConfigError("hpcembed launch needs a command: hpcembed launch srun hpcembed run ...")
    child = subprocess.Popen(command)

    def forward(signum, frame):
        log.info("launch: passing %s to the job step (pid %d)", signal.Signals(signum).name, child.pid)
        child.send_signal(signum)

    for sig in FORWARDED:
        signal.signal(sig, forward)
    rc = child.wait()
    job = os.environ.get("SLURM_JOB_ID")
    if rc == EXIT_STOPPED and requeue and job:
        restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
        log.info("launch: the step stopped early with committed work kept; requeueing job %s (restarts so far: %s)",
                 job, restarts)
        sys.stdout.flush()
        done = subprocess.run(["scontrol", "requeue", job])
        if done.returncode != 0:
            log.error("launch: scontrol requeue %s failed (rc %d); rerun the job to resume", job, done.returncode)
            return rc
        return 0
    return rc
