"""sysgen on Slurm: `sysgen slurm` writes and submits a job array of `sysgen run --shard i/N` tasks
plus a dependent finishing job (merge, report, export); `sysgen status` reads progress across the
shards without touching their stores; `sysgen slurm --resubmit` runs the unfinished shards again.

Layout of a run directory (all of it on the cluster's shared file system):

    RUN/slurm.json        what was submitted (inputs, run options, N): read back by --resubmit
    RUN/jobs.jsonl        one line per submission: the array job ids and which shards each holds
    RUN/scripts/          the sbatch scripts as submitted
    RUN/shards/i/         shard i's `sysgen run --out`: store.db, data.jsonl, dropped.jsonl, task.log,
                          task.json (the task wrapper's own record: running/stopped, host, exit code)
    RUN/finish.json       the finishing job's verdict: merged, or which shards to resubmit
    RUN/merged/           the merged run (then report.md and export/)
"""
