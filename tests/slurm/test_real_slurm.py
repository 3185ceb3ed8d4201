"""`sysgen slurm` and `sysgen status` on a real single-node Slurm (munged, slurmctld, slurmd started
by the `slurm` fixture) with the stand-in engine: an array runs to a merged, accounted result; a
cancelled task and a node going down are resubmitted (or requeued by Slurm) and end with nothing lost
or repeated; Slurm's warning signal before a time limit, and a preemption, requeue a task that
resumes from its store."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm  # a real single-node cluster: make test-fast leaves it out
ROOT = Path(__file__).resolve().parents[2]
ROWS = 240


def _inputs(tmp: Path, rows: int) -> Path:
    path = tmp / "in.jsonl"
    with open(path, "w") as f:
        for i in range(rows):
            f.write(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": f"question number {i}"},
                            {"role": "assistant", "content": f"answer {i}"},
                        ]
                    }
                )
                + "\n"
            )
    return path


class Run:
    def __init__(
        self,
        slurm,
        tmp: Path,
        shards: int,
        concurrent: int,
        delay: str = "0.15",
        submit: bool = True,
        rows: int = ROWS,
    ) -> None:
        self.slurm, self.dir, self.shards, self.rows = slurm, tmp / "run", shards, rows
        self.data = _inputs(tmp, rows)
        # A rejected request now and then: drops with a reason for status and the merge to count.
        self.env = {
            **slurm.env,
            "PYTHONPATH": str(ROOT),
            "SYSGEN_STANDIN_DELAY": delay,
            "SYSGEN_STANDIN_FAULTS": "reject=0.02",
        }
        if submit:
            self.submit(concurrent)

    def submit(self, concurrent: int) -> None:
        self.sysgen(
            "slurm",
            str(self.data),
            "--out",
            str(self.dir),
            "--shards",
            str(self.shards),
            "--concurrent",
            str(concurrent),
            "--engine",
            "standin",
            "--max-inflight",
            "4",
            "--max-retries",
            "0",
        )

    def sysgen(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        p = subprocess.run(
            [sys.executable, "-m", "sysgen", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=self.dir.parent,
        )
        if check:
            assert p.returncode == 0, p.stderr
        return p

    def status(self) -> dict:
        return json.loads(self.sysgen("status", str(self.dir), "--json").stdout)

    def shard(self, i: int) -> Path:
        return self.dir / "shards" / str(i)

    def task(self, i: int) -> dict:
        try:
            return json.loads((self.shard(i) / "task.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def lines(self, i: int) -> int:
        try:
            return (self.shard(i) / "data.jsonl").read_bytes().count(b"\n")
        except FileNotFoundError:
            return 0

    def wait(self, cond, what: str, timeout_s: float = 150.0):
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            got = cond()
            if got is not None and got is not False:
                return got
            time.sleep(0.3)
        raise AssertionError(
            f"timed out waiting for {what}: {self.slurm.run('squeue', check=False)}"
            f"\n{self.sysgen('status', str(self.dir), check=False).stdout}"
        )

    def running_shards(self, k: int = 1) -> list[int]:
        """k shards mid-run at once: their tasks running, some instances done and many left."""

        def mid():
            found = [
                i
                for i in range(self.shards)
                if self.task(i).get("state") == "running"
                and 2 <= self.lines(i) <= self.rows // self.shards // 2
            ]
            return found[:k] if len(found) >= k else None

        return self.wait(mid, f"{k} shard(s) mid-run")

    def array_task(self, shard: int) -> str:
        subs = [json.loads(line) for line in (self.dir / "jobs.jsonl").read_text().splitlines()]
        a = next(a for s in subs for a in s["arrays"] if shard in a["shards"])
        return f"{a['array_job']}_{shard - a['offset']}"

    def finished(self, after: float = 0.0) -> dict:
        def done():
            try:
                rec = json.loads((self.dir / "finish.json").read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                return None
            return rec if rec["at"] > after else None

        return self.wait(done, "the finishing job", timeout_s=240)

    def check_exactly_once(self) -> None:
        """Every input row once in the merged result, and once across the shards' own outputs."""
        merged = self.dir / "merged"
        ids = [
            json.loads(line)["id"]
            for name in ("data.jsonl", "dropped.jsonl")
            for line in (merged / name).read_text().splitlines()
        ]
        per_shard = [
            json.loads(line)["id"]
            for i in range(self.shards)
            for name in ("data.jsonl", "dropped.jsonl")
            for line in (self.shard(i) / name).read_text().splitlines()
        ]
        lost = len(set(range(1, self.rows + 1)) - {int(i.split(":")[1]) for i in ids})
        repeated = len(per_shard) - len(set(per_shard))
        print(
            f"rows {self.rows}, merged {len(ids)}, lines across shards {len(per_shard)}: lost {lost}, "
            f"repeated {repeated}"
        )
        assert lost == 0 and repeated == 0 and len(per_shard) == self.rows
        assert sorted(ids) == sorted(f"in:{i}" for i in range(1, self.rows + 1)), "lost or repeated rows"
        stats = json.loads((merged / "stats.json").read_text())
        assert stats["accounted"] is True and stats["merge"]["duplicates"] == 0


def test_array_runs_to_a_merged_accounted_result_with_status_mid_run(slurm, tmp_path):
    run = Run(slurm, tmp_path, shards=8, concurrent=2)
    subs = (run.dir / "jobs.jsonl").read_text().splitlines()
    assert len(json.loads(subs[0])["arrays"]) == 2  # 8 shards over MaxArraySize=5: two arrays

    def mid():
        st = run.status()
        return st if st["states"]["finished"] >= 1 and st["states"]["running"] >= 1 else None

    st = run.wait(mid, "status with shards finished and running")
    assert st["finished"] is False and st["merged"] is None
    assert sum(st["states"].values()) == 8 and st["states"]["running"] <= 2
    assert st["states"]["failed"] == 0 and st["squeue"] is True
    shards = st["per_shard"]
    assert st["done"] == sum(s["done"] for s in shards.values()) == st["kept"] + st["dropped"]
    for s in shards.values():
        if s["state"] == "finished":
            assert s["done"] > 0 and s["exit_code"] == 0
    assert any(s["tokens_per_s"] for s in shards.values() if s["state"] == "running")
    print(run.sysgen("status", str(run.dir)).stdout)

    rec = run.finished()
    assert rec["merged"] is True, rec
    assert rec["exit_codes"] == {"report": 0, "export": 0}
    run.check_exactly_once()
    st = run.status()
    assert st["finished"] is True and st["merged"] == str(run.dir / "merged")
    assert st["states"]["finished"] == 8 and st["done"] == ROWS
    merged_drops = (run.dir / "merged" / "dropped.jsonl").read_text().splitlines()
    assert sum(st["dropped_by_reason"].values()) == len(merged_drops) == st["dropped"]
    assert (run.dir / "merged" / "report.md").exists()
    assert (run.dir / "merged" / "export" / "messages.jsonl").read_text().count("\n") == st["kept"]

    # The same run directory again with another N: refused, naming why.
    p = run.sysgen(
        "slurm", str(run.data), "--out", str(run.dir), "--shards", "4", "--engine", "standin", check=False
    )
    assert p.returncode == 2 and "--shards 4" in p.stderr and "--resubmit" in p.stderr


def test_cancelled_task_and_downed_node_are_resubmitted_with_nothing_lost_or_repeated(slurm, tmp_path):
    run = Run(slurm, tmp_path, shards=8, concurrent=3, delay="0.3")
    killed, lost = run.running_shards(2)
    # A node lost mid-run: drained (nothing new starts there), then down (its tasks are killed);
    # meanwhile one task is cancelled.
    slurm.run("scontrol", "update", f"nodename={slurm.node}", "state=drain", "reason=sysgen-test")
    slurm.run("scancel", run.array_task(killed))
    run.wait(lambda: run.task(killed).get("state") == "stopped", "the cancelled task to stop")
    slurm.run("scontrol", "update", f"nodename={slurm.node}", "state=down", "reason=sysgen-test")
    run.wait(lambda: run.task(lost).get("state") != "running", "the downed node's task to stop")
    slurm.run("scontrol", "update", f"nodename={slurm.node}", "state=resume")

    rec = run.finished()
    assert rec["merged"] is False and killed in rec["unfinished"], rec
    assert f"sysgen slurm --resubmit {run.dir}" in rec["message"]
    st = run.status()
    assert st["finished"] is False and killed in st["failed_shards"]
    assert st["resubmit"] == f"sysgen slurm --resubmit {run.dir}"
    before = {i: run.lines(i) for i in rec["unfinished"]}

    p = run.sysgen("slurm", "--resubmit", str(run.dir))
    assert f"resubmitting {len(rec['unfinished'])} of 8 shards" in p.stderr
    rec = run.finished(after=rec["at"])
    assert rec["merged"] is True, rec
    run.check_exactly_once()
    for i, n in before.items():  # each resubmitted shard resumed: what it had finished was not redone
        log = (run.shard(i) / "task.log").read_text()
        if n:
            assert "already done by an earlier run" in log.rsplit("sysgen slurm: shard", 1)[1]


def test_time_limit_warning_stops_the_task_which_requeues_and_resumes(slurm, tmp_path):
    # A 1-minute limit and the warning 50 s before it: Slurm sends USR1 (--signal=B:USR1@50) within
    # its next periodic check, the task stops cleanly and requeues itself, the next start resumes.
    run = Run(slurm, tmp_path, shards=1, concurrent=1, delay="0.3", submit=False, rows=200)
    run.sysgen(
        "slurm",
        str(run.data),
        "--out",
        str(run.dir),
        "--shards",
        "1",
        "--concurrent",
        "1",
        "--engine",
        "standin",
        "--max-inflight",
        "4",
        "--time",
        "1",
        "--signal-s",
        "50",
    )
    rec = run.finished()
    assert rec["merged"] is True, rec
    task = run.task(0)
    assert task["state"] == "finished" and task["restarts"] >= 1
    log = (run.shard(0) / "task.log").read_text()
    assert "stopped on Slurm's warning signal" in log
    assert "already done by an earlier run" in log.rsplit("sysgen slurm: shard", 1)[1]
    run.check_exactly_once()


def test_preempted_task_is_requeued_by_slurm_and_resumes(slurm, tmp_path):
    # The test cluster's `urgent` partition preempts `debug` with PreemptMode=REQUEUE: Slurm sends the
    # task SIGTERM, the task stops cleanly, and Slurm itself puts it back in the queue.
    run = Run(slurm, tmp_path, shards=1, concurrent=1, delay="0.3", submit=False, rows=80)
    run.sysgen(
        "slurm",
        str(run.data),
        "--out",
        str(run.dir),
        "--shards",
        "1",
        "--concurrent",
        "1",
        "--engine",
        "standin",
        "--max-inflight",
        "4",
        "--cpus-per-task",
        str(slurm.cpus),
    )
    run.running_shards(1)
    urgent = tmp_path / "urgent.sh"
    urgent.write_text("#!/bin/bash\nsleep 1\n")
    slurm.run(
        "sbatch",
        "--partition=urgent",
        f"--cpus-per-task={slurm.cpus}",
        f"--output={tmp_path}/urgent.out",
        str(urgent),
    )
    run.wait(lambda: run.task(0).get("state") == "stopped", "the preempted task to stop")
    rec = run.finished()
    assert rec["merged"] is True, rec
    task = run.task(0)
    assert task["state"] == "finished" and task["restarts"] >= 1
    log = (run.shard(0) / "task.log").read_text()
    assert "stopped by SIGTERM" in log
    assert "already done by an earlier run" in log.rsplit("sysgen slurm: shard", 1)[1]
    run.check_exactly_once()
