"""The sbatch scripts: one job array of shard tasks (a chunk of the shards, `offset` added to the
array index) and the finishing job. Pure text: written, printed by --dry-run, submitted by submit.py."""

from __future__ import annotations

import shlex
from pathlib import Path

from sysgen.slurm.settings import SlurmSettings

# The task wrapper. Why it is shaped so:
# - bash runs a trap only after its foreground command ends, so sysgen runs in the background and
#   the script `wait`s for it (a trapped signal ends the wait at once).
# - USR1 is the warning Slurm sends (--signal=B:USR1@S) before the time limit: sysgen is told to
#   stop (it commits what is finished, up to DRAIN_S s) and the task requeues itself; the requeued
#   task resumes from the shard's store. TERM (scancel, preemption, a node going down): the same
#   clean stop; Slurm decides whether it runs again (preemption with PreemptMode=REQUEUE does).
# - task.json is the wrapper's own record for `sysgen status` (which never opens a running store).
_TASK = r"""
set -u
RUN={run}
N={n}
PY={py}
SHARD=$((SLURM_ARRAY_TASK_ID + {offset}))
DIR="$RUN/shards/$SHARD"
mkdir -p "$DIR"
LOG="$DIR/task.log"
note() {{
  printf '{{"state": "%s", "rc": %s, "job": "%s", "array_job": "%s", "host": "%s", ' \
    "$1" "${{2:-null}}" "${{SLURM_JOB_ID:-}}" "${{SLURM_ARRAY_JOB_ID:-}}" "$(hostname)" > "$DIR/task.json.tmp"
  printf '"restarts": %s, "at": %s}}\n' "${{SLURM_RESTART_COUNT:-0}}" "$(date +%s)" >> "$DIR/task.json.tmp"
  mv -f "$DIR/task.json.tmp" "$DIR/task.json"
}}
child=""
engine=""
stop_engine() {{
  if [ -n "$engine" ]; then kill -TERM -- "-$engine" 2>/dev/null; wait "$engine" 2>/dev/null; fi
}}
on_signal() {{
  trap '' USR1 TERM
  rc=143
  if [ -n "$child" ]; then kill -TERM "$child" 2>/dev/null; wait "$child"; rc=$?; fi
  stop_engine
  if [ "$1" = USR1 ]; then
    note requeued "$rc"
    echo "sysgen slurm: shard $SHARD/$N stopped on Slurm's warning signal (rc $rc); requeueing" >> "$LOG"
    scontrol requeue "$SLURM_JOB_ID"
  else
    note stopped "$rc"
    echo "sysgen slurm: shard $SHARD/$N stopped by SIGTERM (rc $rc)" >> "$LOG"
  fi
  exit "$rc"
}}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM
note running
echo "sysgen slurm: shard $SHARD/$N, job ${{SLURM_JOB_ID:-?}} on $(hostname)," \
  "restart ${{SLURM_RESTART_COUNT:-0}}, $(date -u +%FT%TZ)" >> "$LOG"
{engine}"$PY" -m sysgen run {inputs} {run_args} --out "$DIR" --shard "$SHARD/$N" --no-report >> "$LOG" 2>&1 &
child=$!
wait "$child"
rc=$?
stop_engine
if [ "$rc" -eq 0 ]; then note finished 0; else note failed "$rc"; fi
exit "$rc"
"""

# A local server for the whole node (e.g. SGLang with --dp-size 8): started in its own process group
# so that stopping it stops all its workers, then polled until it answers.
_ENGINE = r"""setsid bash -c {cmd} >> "$DIR/engine.log" 2>&1 &
engine=$!
"$PY" -c 'import sys, time, urllib.request
for _ in range(1800):
    try:
        urllib.request.urlopen(sys.argv[1], timeout=5); sys.exit(0)
    except Exception:
        time.sleep(1)
sys.exit("engine at " + sys.argv[1] + " did not answer within 30 minutes")' {url} >> "$LOG" 2>&1 || {{
  stop_engine; note failed 3; exit 3; }}
"""


def _sbatch_lines(s: SlurmSettings) -> list[str]:
    lines = []
    if s.partition:
        lines.append(f"--partition={s.partition}")
    if s.gpus_per_task:
        lines.append(f"--gres=gpu:{s.gpus_per_task}")
    if s.cpus_per_task:
        lines.append(f"--cpus-per-task={s.cpus_per_task}")
    if s.mem:
        lines.append(f"--mem={s.mem}")
    if s.time:
        lines.append(f"--time={s.time}")
    return lines + list(s.sbatch)


def array_spec(shards: list[int], offset: int, concurrent: int) -> str:
    """--array value: ranges of array indices (shard - offset), then %concurrent."""
    idx = sorted(i - offset for i in shards)
    parts, start = [], idx[0]
    for a, b in zip(idx, idx[1:] + [None], strict=True):
        if b != a + 1:
            parts.append(str(start) if start == a else f"{start}-{a}")
            start = b
    return ",".join(parts) + f"%{concurrent}"


def task_script(s: SlurmSettings, run_dir: Path, shards: list[int], offset: int) -> str:
    name = run_dir.name
    head = [
        "#!/bin/bash",
        f"#SBATCH --job-name=sysgen-{name}",
        f"#SBATCH --array={array_spec(shards, offset, s.concurrent)}",
        f"#SBATCH --output={run_dir}/logs/%A_%a.out",
        "#SBATCH --open-mode=append",
        "#SBATCH --requeue",
        f"#SBATCH --signal=B:USR1@{s.signal_s}",
    ]
    head += [f"#SBATCH {line}" for line in _sbatch_lines(s)]
    head.append(f"# Written by `sysgen slurm`: shard i of {s.shards} is array index i - {offset}.")
    engine = ""
    if s.engine_cmd:
        engine = _ENGINE.format(cmd=shlex.quote(s.engine_cmd), url=shlex.quote(s.engine_ready or ""))
    body = _TASK.format(
        run=shlex.quote(str(run_dir)),
        n=s.shards,
        py=shlex.quote(s.python),
        offset=offset,
        engine=engine,
        inputs=" ".join(map(shlex.quote, s.inputs)),
        run_args=" ".join(map(shlex.quote, s.run_args)),
    )
    return "\n".join(head) + "\n" + body


def finish_script(s: SlurmSettings, run_dir: Path) -> str:
    """After every array task ends (afterany, given on the sbatch command line): merge, report and
    export when all shards are finished, else say which to resubmit."""
    head = [
        "#!/bin/bash",
        f"#SBATCH --job-name=sysgen-{run_dir.name}-finish",
        f"#SBATCH --output={run_dir}/logs/finish-%j.out",
        "#SBATCH --open-mode=append",
    ]
    if s.partition:
        head.append(f"#SBATCH --partition={s.partition}")
    if s.time:
        head.append(f"#SBATCH --time={s.time}")
    head += [f"#SBATCH {line}" for line in s.sbatch]  # e.g. --account, which the cluster may require
    run = f"exec {shlex.quote(s.python)} -m sysgen slurm --finish {shlex.quote(str(run_dir))}"
    return "\n".join(head) + "\n" + run + "\n"
