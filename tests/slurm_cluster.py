"""A real Slurm on this machine: slurmctld and one slurmd per fake node (Debian's packages), all state in a temp
directory, every daemon started in the foreground and stopped by its PID.

Fake nodes share this host under their own names and ports; each has 8 CPUs (oversubscribed) and 2 fake GPUs,
character devices made with mknod that gres hands out as CUDA_VISIBLE_DEVICES. Auth is auth/none (no munge).
Settings from shared/FACTS.md: backfill every second (het jobs start only from backfill), MinJobAge=4 (sbatch
--wait polls every 2 s), EnforcePartLimits=ALL (an impossible request fails instead of pending forever). And
cred_expire=5: a requeued job may start again only after cred_expire (120 s by default; measured 164 s here).

MPICH 4 names its shared-memory segment after a hash of the PMI job name (Slurm's pmi2: job id and step) and
leaves it in /dev/shm when ranks are killed. A later step with the same name (a requeued job, or job ids counting
from 1 again in the next test cluster) attaches to the stale segment and fails in MPI_Init ("Out of memory",
"failed to unpack address") or hangs: measured 4 of 12 sruns with 176 stale segments here, 0 of 12 without. So
job ids start at a random number, and an epilog removes segments no process maps any more, as sites' epilogs do.
"""
from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

EPILOG = """#!/bin/sh
# Remove MPICH shared-memory segments that no process maps any more (see tests/slurm_cluster.py).
for f in /dev/shm/mpich_shm_* /dev/shm/mpich_vci_*; do
    [ -e "$f" ] || continue
    grep -qsF "$f" /proc/[0-9]*/maps || rm -f "$f"
done
exit 0
"""

NODES = 3
CPUS = 8
GPUS = 2


def slurm_available() -> bool:
    return all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch")) and os.geteuid() == 0


def _free_port_range(count: int) -> int:
    for base in range(23000, 60000, 97):
        try:
            socks = []
            for k in range(count):
                s = socket.socket()
                s.bind(("127.0.0.1", base + k))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range for the Slurm daemons")


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.procs: list[subprocess.Popen] = []
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def _write_config(self) -> None:
        host = socket.gethostname()
        base = _free_port_range(NODES + 1)
        dev = self.root / "dev"
        dev.mkdir(parents=True, exist_ok=True)
        for g in range(GPUS):
            node = dev / f"gpu{g}"
            if not node.exists():
                os.mknod(node, 0o666 | 0o020000, os.makedev(1, 3))      # a character device, as gres requires
        for d in ("state", "spool", "log"):
            (self.root / d).mkdir(exist_ok=True)
        epilog = self.root / "epilog.sh"
        epilog.write_text(EPILOG)
        epilog.chmod(0o755)
        subprocess.run([str(epilog)], check=True, timeout=30)      # what earlier runs left behind
        self.conf.write_text(f"""ClusterName=hpcembed-ci
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={base + NODES}
SlurmUser=root
AuthType=auth/none
CredType=cred/none
AuthInfo=cred_expire=5
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=pmi2
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1
MinJobAge=4
FirstJobId={random.randrange(1000, 1_000_000)}
Epilog={epilog}
EnforcePartLimits=ALL
ReturnToService=2
JobRequeue=1
KillWait=30
SlurmdParameters=config_overrides
GresTypes=gpu
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool/%n
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd-%n.pid
SlurmctldLogFile={self.root}/log/slurmctld.log
SlurmdLogFile={self.root}/log/slurmd-%n.log
NodeName=n[1-{NODES}] NodeHostname={host} NodeAddr=127.0.0.1 Port=[{base}-{base + NODES - 1}] CPUs={CPUS} Gres=gpu:{GPUS} State=UNKNOWN
PartitionName=ci Nodes=n[1-{NODES}] Default=YES MaxTime=INFINITE State=UP
""")
        (self.root / "gres.conf").write_text(f"AutoDetect=off\nNodeName=n[1-{NODES}] Name=gpu File={dev}/gpu[0-{GPUS - 1}]\n")

    def start(self, timeout: float = 60) -> "SlurmCluster":
        self._write_config()
        log = open(self.root / "log" / "daemons.out", "w")
        self.procs.append(subprocess.Popen(["slurmctld", "-D", "-i", "-f", str(self.conf)], stdout=log,
                                           stderr=subprocess.STDOUT, env=self.env))
        for n in range(1, NODES + 1):
            (self.root / "spool" / f"n{n}").mkdir(parents=True, exist_ok=True)
            self.procs.append(subprocess.Popen(["slurmd", "-D", "-f", str(self.conf), "-N", f"n{n}"], stdout=log,
                                               stderr=subprocess.STDOUT, env=self.env))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = self.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.split()
            if len(states) == NODES and all(s == "idle" for s in states):
                return self
            for p in self.procs:
                if p.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"a Slurm daemon exited (rc {p.returncode}): "
                                       f"{(self.root / 'log' / 'daemons.out').read_text()[-2000:]}")
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"Slurm nodes not idle within {timeout} s: {states}")

    def run(self, *cmd: str, check: bool = True, timeout: float = 60, env: dict | None = None, cwd=None):
        proc = subprocess.run(["timeout", str(int(timeout)), *cmd], capture_output=True, text=True,
                              env={**self.env, **(env or {})}, cwd=cwd, timeout=timeout + 10)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr[-2000:]}")
        return proc

    def diagnose(self) -> str:
        """What Slurm thinks of its jobs and nodes, and the tails of the daemons' logs: for a test that failed."""
        parts = []
        for cmd in (("squeue", "-a", "-o", "%i %j %T %r %N %M"), ("sinfo", "-N", "-o", "%N %T %E"),
                    ("scontrol", "show", "job")):
            proc = self.run(*cmd, check=False, timeout=20)
            parts.append(f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
        for log in sorted((self.root / "log").glob("*.log")):
            parts.append(f"--- {log.name} (tail)\n" + "\n".join(log.read_text(errors="replace").splitlines()[-40:]))
        return "\n".join(parts)

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=5)           # a daemon's state is thrown away with its directory: no need to wait
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        self.procs.clear()
