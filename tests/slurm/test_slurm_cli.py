"""`sysgen slurm` / `sysgen status` without a cluster: the scripts --dry-run prints, splitting over
MaxArraySize, refusals, the file-system check, status figures from a shard folder, the finishing
job's verdict on missing shards. The real-cluster tests are in test_real_slurm.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sysgen.cli import main
from sysgen.slurm import fsys, settings, status, submit
from sysgen.slurm.finish import finish
from sysgen.slurm.script import array_spec
from sysgen.slurm.settings import SlurmSettings


@pytest.fixture
def data(tmp_path) -> Path:
    path = tmp_path / "in.jsonl"
    path.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"q{i}"},
                        {"role": "assistant", "content": f"a{i}"},
                    ]
                }
            )
            + "\n"
            for i in range(20)
        )
    )
    return path


@pytest.fixture
def no_slurm(monkeypatch):
    """As on a machine without Slurm's commands (whatever this one has)."""
    monkeypatch.setattr(submit.shutil, "which", lambda name: None)


def test_dry_run_prints_the_array_and_finishing_job_and_writes_nothing(data, tmp_path, capsys, no_slurm):
    run = tmp_path / "run"
    rc = main(
        [
            "slurm",
            str(data),
            "--out",
            str(run),
            "--shards",
            "16",
            "--concurrent",
            "4",
            "--engine",
            "standin",
            "--temperature",
            "0.5",
            "--no-constrain",
            "--gpus-per-task",
            "1",
            "--time",
            "4:00:00",
            "--partition",
            "gpu",
            "--sbatch=--account=proj",
            "--dry-run",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and not run.exists()
    for line in (
        "#SBATCH --array=0-15%4",
        "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@120",
        "#SBATCH --gres=gpu:1",
        "#SBATCH --time=4:00:00",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj",
        "--dependency=afterany:<array 0>",
        "-m sysgen slurm --finish",
    ):
        assert line in out
    run_line = next(line for line in out.splitlines() if " -m sysgen run " in line)
    assert f"{data} --engine standin --no-constrain --temperature 0.5" in run_line
    assert '--shard "$SHARD/$N"' in run_line and "N=16" in out


def test_arrays_over_max_array_size_are_split_and_chained(data, tmp_path, capsys, monkeypatch, no_slurm):
    monkeypatch.setattr(submit, "max_array_size", lambda: (1001, "the cluster's MaxArraySize"))
    rc = main(
        [
            "slurm",
            str(data),
            "--out",
            str(tmp_path / "run"),
            "--shards",
            "2500",
            "--concurrent",
            "64",
            "--engine",
            "standin",
            "--dry-run",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "2500 shards exceed MaxArraySize=1001 (the cluster's MaxArraySize): split into 3 arrays" in out
    assert out.count("#SBATCH --array=0-1000%64") == 2 and "#SBATCH --array=0-497%64" in out
    assert "is array index i - 1001." in out and "is array index i - 2002." in out
    assert "--dependency=afterany:<array 1>" in out
    assert "--dependency=afterany:<array 0>:<array 1>:<array 2>" in out


def test_chunks_and_array_spec():
    assert submit.chunks([0, 1, 2, 7, 8, 9], 5) == [(0, [0, 1, 2]), (7, [7, 8, 9])]
    assert array_spec([3, 4, 5, 9, 11, 12], 3, 2) == "0-2,6,8-9%2"


@pytest.mark.parametrize(
    "bad, says",
    [
        (["--shard", "0/2"], "--shard"),
        (["--api-key", "k"], "--api-key"),
        (["--temperature", "-1"], "--temperature"),
        (["--shards", "0"], "--shards"),
        (["--engine-cmd", "serve"], "--engine-ready"),
    ],
)
def test_bad_submission_is_refused_before_anything_is_written(data, tmp_path, capsys, bad, says, no_slurm):
    run = tmp_path / "run"
    assert main(["slurm", str(data), "--out", str(run), "--engine", "standin", *bad]) == 2
    err = capsys.readouterr().err
    assert says in err and err.startswith("sysgen slurm: error:") and not run.exists()


def test_unknown_run_flag_is_a_usage_error(data, tmp_path):
    assert main(["slurm", str(data), "--out", str(tmp_path / "run"), "--no-such-flag"]) == 2


def test_without_sbatch_nothing_is_written(data, tmp_path, capsys, no_slurm):
    run = tmp_path / "run"
    assert main(["slurm", str(data), "--out", str(run), "--engine", "standin"]) == 1
    assert "sbatch not found" in capsys.readouterr().err and not (run / settings.FILE).exists()


def _submitted(run: Path, data: Path, shards: int = 3, run_args=("--engine", "standin")) -> SlurmSettings:
    s = SlurmSettings(
        inputs=[str(data)],
        run_args=list(run_args),
        shards=shards,
        concurrent=2,
        python="py",
        input_stamps=settings.stamps([str(data)]),
    )
    settings.save(run, s)
    return s


@pytest.mark.parametrize(
    "args, says",
    [
        (["--shards", "4"], "--shards 4 (it was submitted with --shards 3)"),
        (["--shards", "3", "--temperature", "0.3"], "other run options"),
        (["--shards", "3"], "it already holds this submission"),
    ],
)
def test_second_submission_into_a_run_dir_is_refused_with_the_reason(data, tmp_path, capsys, args, says):
    run = tmp_path / "run"
    _submitted(run, data)
    assert main(["slurm", str(data), "--out", str(run), "--engine", "standin", *args]) == 2
    err = capsys.readouterr().err
    assert says in err and f"sysgen slurm --resubmit {run}" in err


def test_other_inputs_are_refused_and_a_changed_input_blocks_resubmit(data, tmp_path, capsys, no_slurm):
    run = tmp_path / "run"
    _submitted(run, data)
    other = tmp_path / "other.jsonl"
    other.write_text(data.read_text())
    assert main(["slurm", str(other), "--out", str(run), "--engine", "standin", "--shards", "3"]) == 2
    assert "other inputs" in capsys.readouterr().err
    with open(data, "a") as f:
        f.write(data.read_text().splitlines()[0] + "\n")
    assert main(["slurm", "--resubmit", str(run), "--dry-run"]) == 2
    assert "changed since the first submission" in capsys.readouterr().err


def _shard(run: Path, i: int, task: dict | None, kept: int, drops: list[str], log: str = "") -> Path:
    d = run / "shards" / str(i)
    d.mkdir(parents=True)
    (d / "data.jsonl").write_text("".join(json.dumps({"id": f"in:{i}-{k}"}) + "\n" for k in range(kept)))
    (d / "dropped.jsonl").write_text(
        "".join(
            json.dumps({"id": f"d{i}-{k}", "phase": r.split(":")[0], "reason": r.split(":")[1]}) + "\n"
            for k, r in enumerate(drops)
        )
    )
    if task is not None:
        (d / "task.json").write_text(json.dumps(task))
    (d / "task.log").write_text(log)
    return d


def test_status_reads_figures_from_shard_folders_without_opening_stores(data, tmp_path, capsys, no_slurm):
    run = tmp_path / "run"
    _submitted(run, data, shards=4)
    done = {"state": "finished", "rc": 0, "job": "7", "host": "n1", "restarts": 1}
    _shard(run, 0, done, 5, ["p1:unparsed"])
    d1 = _shard(
        run,
        1,
        {"state": "running", "job": "8", "host": "n2", "restarts": 0},
        3,
        ["p3:bad_verdict", "p1:unparsed"],
        "[ 40.0%] 4 done (3 kept) | 2.0 inst/s | 1,500 out tok/s | in-flight 4 | store hits 0% | "
        "ETA 0:00:10\n[ 50.0%] 5 done (3 kept) | 2.5 inst/s | 1,234 out tok/s | in-flight 4 | "
        "store hits 0% | ETA 0:01:05\n",
    )
    with open(d1 / "data.jsonl", "a") as f:
        f.write('{"id": "in:half')  # a line being written: not counted yet
    _shard(run, 2, {"state": "stopped", "rc": 130, "job": "9", "host": "n3"}, 2, [])
    (run / "shards" / "0" / "store.db").write_bytes(b"not a database: status must not open it")
    st = status.status(run)
    assert st["states"] == {"finished": 1, "running": 1, "pending": 0, "failed": 1, "not started": 1}
    assert (st["done"], st["kept"], st["dropped"]) == (13, 10, 3)
    assert st["dropped_by_reason"] == {"p1:unparsed": 2, "p3:bad_verdict": 1}
    one = st["per_shard"]["1"]
    assert (one["done"], one["tokens_per_s"], one["eta_s"], one["items_per_s"]) == (5, 1234.0, 65, 2.5)
    assert st["tokens_per_s"] == 1234.0 and st["eta_s"] == 65
    assert st["finished"] is False and st["merged"] is None and st["failed_shards"] == [2]
    assert st["squeue"] is False
    assert main(["status", str(run)]) == 0
    text = capsys.readouterr().out
    assert "1 finished, 1 running, 0 pending, 1 failed, 1 not started" in text
    assert "(squeue not available" in text and f"sysgen slurm --resubmit {run}" in text
    assert main(["status", str(tmp_path)]) == 2


def test_finish_refuses_to_merge_and_names_the_shards_to_resubmit(data, tmp_path, capsys, no_slurm):
    run = tmp_path / "run"
    _submitted(run, data, shards=3)
    _shard(run, 0, {"state": "stopped"}, 2, [])
    assert finish(run) == 1
    rec = json.loads((run / "finish.json").read_text())
    assert rec["merged"] is False and rec["unfinished"] == [0, 1, 2]
    assert "shard 1 has no outputs (never ran)" in rec["problems"]
    assert rec["resubmit"] == f"sysgen slurm --resubmit {run}" and not (run / "merged").exists()
    assert status.status(run)["finish"]["merged"] is False


def test_resubmit_runs_only_unfinished_shards_with_saved_settings(data, tmp_path, capsys, no_slurm):
    run = tmp_path / "run"
    _submitted(run, data, shards=5, run_args=["--engine", "standin", "--temperature", "0.2"])
    for i in (0, 3):
        _shard(run, i, {"state": "finished", "rc": 0}, 1, [])
    assert main(["slurm", "--resubmit", str(run), "--concurrent", "1", "--dry-run"]) == 0
    out = capsys.readouterr()
    assert "resubmitting 3 of 5 shards (1, 2, 4)" in out.err
    assert "#SBATCH --array=0-1,3%1" in out.out and "is array index i - 1." in out.out
    assert "--engine standin --temperature 0.2" in out.out


def test_fs_type_and_the_unsafe_file_systems(tmp_path, monkeypatch):
    table = "/dev/sda1 / ext4 rw 0 0\nserver:/share /shared nfs4 rw 0 0\n//nas/x /shared/smb cifs rw 0 0\n"
    assert fsys.mount_type("/shared/runs/x", table) == "nfs4"
    assert fsys.mount_type("/shared/smb/runs", table) == "cifs"
    assert fsys.mount_type("/sharedx", table) == "ext4"
    assert fsys.fs_type(tmp_path / "not" / "yet") is not None  # this machine's own table
    monkeypatch.setattr(fsys, "fs_type", lambda path: "cifs")
    assert "cifs file system" in fsys.store_fs_problem(tmp_path)
    monkeypatch.setattr(fsys, "fs_type", lambda path: "nfs4")
    assert fsys.store_fs_problem(tmp_path) is None


def test_run_dir_on_an_unsafe_file_system_is_refused(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(fsys, "fs_type", lambda path: "cifs")
    assert main(["slurm", str(data), "--out", str(tmp_path / "run"), "--engine", "standin", "--dry-run"]) == 2
    assert "--allow-fs" in capsys.readouterr().err


def test_resubmit_with_every_shard_finished_runs_the_finishing_job_alone(data, tmp_path, capsys, no_slurm):
    run = tmp_path / "run"
    _submitted(run, data, shards=2)
    for i in (0, 1):
        _shard(run, i, {"state": "finished", "rc": 0}, 1, [])
    assert main(["slurm", "--resubmit", str(run), "--dry-run"]) == 0
    out = capsys.readouterr()
    assert "every shard of" in out.err and "#SBATCH --array" not in out.out
    assert "# sbatch --parsable " in out.out and "--dependency" not in out.out


def test_resubmit_is_refused_while_the_run_has_jobs_in_slurm(data, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    _submitted(run, data, shards=4)
    array = {"array_job": "41", "offset": 2, "shards": [2, 3]}
    (run / "jobs.jsonl").write_text(json.dumps({"arrays": [array], "finish_job": "42"}) + "\n")
    monkeypatch.setattr(status, "_squeue", lambda: [("41", "1", "RUNNING"), ("42", "N/A", "PENDING")])
    assert status.live_tasks(run) == {3: "RUNNING"}
    assert main(["slurm", "--resubmit", str(run), "--dry-run"]) == 2
    assert "shards 3 are still pending or running" in capsys.readouterr().err
    monkeypatch.setattr(status, "_squeue", lambda: [("42", "N/A", "PENDING")])
    assert main(["slurm", "--resubmit", str(run), "--dry-run"]) == 2
    assert "its finishing job 42 is still pending" in capsys.readouterr().err


def test_cluster_unavailable_names_what_is_missing(monkeypatch):
    from tests.slurm import cluster

    monkeypatch.setattr(cluster.shutil, "which", lambda name: None if name == "slurmd" else "/usr/bin/x")
    assert cluster.unavailable() == (
        "slurmd not installed (apt-get install slurm-wlm munge; .ci/run does this)"
    )
