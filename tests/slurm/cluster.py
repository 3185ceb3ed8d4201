"""A real single-node Slurm cluster for the tests: munged, slurmctld and slurmd run from a temp
folder (config, state, sockets, logs), bound to 127.0.0.1 on free non-default ports, and stopped
afterwards. Needs Debian's `slurm-wlm` and `munge` and root (slurmd runs jobs as their user);
`unavailable()` says exactly what is missing so the tests can skip naming it."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel")


def unavailable() -> str | None:
    """Why a cluster cannot start here, or None."""
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        return f"{', '.join(missing)} not installed (apt-get install slurm-wlm munge; .ci/run does this)"
    if os.geteuid() != 0:
        return "not root: slurmd must run as root to start jobs"
    return None


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Cluster:
    """`env` holds SLURM_CONF for the client commands (sbatch, squeue...). Jobs in the `urgent`
    partition preempt (requeue) those of the default `debug` one."""

    def __init__(self, root: Path, cpus: int = 4, max_array_size: int = 1001) -> None:
        self.root = root
        self.node = socket.gethostname().split(".")[0]
        self.cpus = cpus
        self.max_array_size = max_array_size
        self.procs: list[subprocess.Popen] = []
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def _write_config(self) -> None:
        r = self.root
        for d in ("munge", "ctld", "spool", "log"):
            (r / d).mkdir(parents=True, exist_ok=True)
        # munged checks that its socket's folder and every parent are not writable by others, and
        # slurmd (as root) and the job's user must reach the socket: 0755 all the way.
        os.chmod(r, 0o755)
        os.chmod(r / "munge", 0o755)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        ctld_port, d_port = _free_ports(2)
        # cred_expire and sched_interval short: a requeued job otherwise waits ~2 minutes to restart.
        self.conf.write_text(f"""\
ClusterName=sysgentest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r}/munge/munge.socket,cred_expire=5
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r}/ctld
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/ctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,sched_min_interval=100000
ReturnToService=2
MpiDefault=none
SwitchType=switch/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SlurmdParameters=config_overrides
MaxArraySize={self.max_array_size}
MinJobAge=600
KillWait=10
SlurmdTimeout=30
InactiveLimit=0
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=1000 State=UNKNOWN
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP PriorityTier=1
PartitionName=urgent Nodes={self.node} MaxTime=INFINITE State=UP PriorityTier=2
""")

    def start(self, timeout_s: float = 30.0) -> None:
        self._write_config()
        r = self.root
        self._spawn(
            [
                "munged",
                "-F",
                "--force",
                f"--socket={r}/munge/munge.socket",
                f"--key-file={r}/munge/munge.key",
                f"--pid-file={r}/munge/munged.pid",
                f"--seed-file={r}/munge/munged.seed",
                f"--log-file={r}/log/munged.log",
            ]
        )
        self._wait(lambda: (r / "munge" / "munge.socket").exists(), timeout_s, "munged's socket")
        self._spawn(["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._wait(lambda: self._ok(["scontrol", "ping"], "UP"), timeout_s, "slurmctld answering")
        self._spawn(["slurmd", "-D", "-f", str(self.conf), "-N", self.node])
        self._wait(lambda: self._ok(["sinfo", "-h", "-o", "%t"], "idle"), timeout_s, "the node idle")

    def _spawn(self, cmd: list[str]) -> None:
        with open(self.root / "log" / f"{cmd[0]}.out", "ab") as log:  # the child keeps its own copy
            self.procs.append(
                subprocess.Popen(
                    cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            )

    def _ok(self, cmd: list[str], want: str) -> bool:
        p = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=10)
        return p.returncode == 0 and want in p.stdout

    def _wait(self, cond, timeout_s: float, what: str) -> None:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(
                        f"{p.args[0]} exited ({p.returncode}) waiting for {what}: {self.log_tail()}"
                    )
            if cond():
                return
            time.sleep(0.2)
        raise RuntimeError(f"timed out after {timeout_s:g} s waiting for {what}: {self.log_tail()}")

    def log_tail(self, lines: int = 5) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*")):
            tail = f.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"{f.name}: " + " | ".join(tail))
        return "; ".join(out)

    def run(self, *cmd: str, check: bool = True) -> str:
        p = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=30)
        if check and p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {p.stderr.strip()}")
        return p.stdout

    def stop(self) -> None:
        # Jobs first, and wait until they are gone while slurmctld and munged still run: a job step
        # that cannot report its end keeps retrying (slurmd waits for it, then it is orphaned).
        if all(p.poll() is None for p in self.procs):
            subprocess.run(
                ["scancel", "--full", "--quiet", "-u", "root"], env=self.env, capture_output=True, timeout=30
            )
            end = time.monotonic() + 30
            while time.monotonic() < end and self.run("squeue", "-h", check=False).strip():
                time.sleep(0.2)
        for p in reversed(self.procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
