"""`sysgen slurm` and `sysgen status`: argument parsing and the commands. `sysgen slurm` takes every
`sysgen run` option (the run parser is its parent) and passes those given to each task."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

import orjson

from sysgen.cli_args import MAX_SHARDS, whole
from sysgen.config import RunConfig, config_fields
from sysgen.slurm import settings
from sysgen.slurm.settings import ARRAY_FIELDS, SlurmSettings

# Chosen by sysgen slurm itself for each task, so never taken from the command line.
_OWN = ("inputs", "out", "shard")
CONCURRENT = 8
SIGNAL_S = 120  # a drain (up to DRAIN_S) and a commit fit well within it


def _run_args(args: argparse.Namespace) -> list[str]:
    """The `sysgen run` options given (those that differ from their defaults), as flags."""
    out = []
    for f in config_fields():
        if f.name in _OWN:
            continue
        value = getattr(args, f.name)
        if value == f.default:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            out.append(flag if value else "--no-" + flag[2:])
        else:
            out += [flag, str(value)]
    return out


def _settings(args: argparse.Namespace) -> SlurmSettings:
    if args.api_key:
        raise ValueError(
            "--api-key would be written into the sbatch scripts. Fix: export OPENAI_API_KEY "
            "(or VLLM_API_KEY) instead; sbatch passes the environment to the tasks"
        )
    if args.shard:
        raise ValueError(
            "--shard: sysgen slurm gives each task its shard. Fix: drop --shard; --shards N sets how many"
        )
    if not args.inputs:
        raise ValueError("no INPUTS. Fix: sysgen slurm DATA... --out RUN_DIR --shards N --concurrent M")
    concurrent = CONCURRENT if args.concurrent is None else args.concurrent
    shards = 4 * concurrent if args.shards is None else args.shards
    if shards < 1 or concurrent < 1:
        raise ValueError("--shards and --concurrent must be >= 1")
    if args.model and os.path.exists(args.model):  # tasks, and a later --resubmit, may start elsewhere
        args.model = str(Path(args.model).resolve())
    kw = {f.name: getattr(args, f.name) for f in config_fields()}
    RunConfig(**{**kw, "inputs": tuple(args.inputs), "shard": f"0/{shards}"})  # every value checked
    if bool(args.engine_cmd) != bool(args.engine_ready):
        raise ValueError(
            "--engine-cmd and --engine-ready go together (the command that starts the node's "
            "server and the URL that answers once it is up)"
        )
    inputs = settings.absolute_inputs(list(args.inputs))
    return SlurmSettings(
        inputs=inputs,
        run_args=_run_args(args),
        shards=shards,
        concurrent=concurrent,
        partition=args.partition,
        gpus_per_task=args.gpus_per_task,
        cpus_per_task=args.cpus_per_task,
        mem=args.mem,
        time=args.time,
        signal_s=args.signal_s or SIGNAL_S,
        sbatch=list(args.sbatch or []),
        engine_cmd=args.engine_cmd,
        engine_ready=args.engine_ready,
        python=sys.executable,
        input_stamps=settings.stamps(inputs),
    )


def _resubmit_settings(args: argparse.Namespace, run_dir: Path) -> SlurmSettings:
    s = settings.load(run_dir)
    if s is None:
        raise ValueError(
            f"{run_dir}: no {settings.FILE}: nothing was submitted there. Fix: give the --out "
            "of a `sysgen slurm` run"
        )
    changed = settings.changed_inputs(s)
    if changed:
        raise ValueError(
            f"{', '.join(changed)} changed since the first submission: the shards would mix two "
            "inputs. Fix: restore the file, or submit into a new --out"
        )
    for name in ARRAY_FIELDS:  # the array's own options may change on a resubmit
        given = getattr(args, name, None)
        if name not in ("python", "sbatch") and given is not None:
            setattr(s, name, given)
    if args.sbatch:
        s.sbatch = list(args.sbatch)
    s.python = sys.executable
    return s


def cmd_slurm(args: argparse.Namespace) -> int:
    from sysgen.slurm.finish import finish
    from sysgen.slurm.fsys import store_fs_problem
    from sysgen.slurm.submit import SlurmError, require_sbatch, submissions, submit

    try:
        if args.finish:
            return finish(Path(args.finish).resolve())
        if args.resubmit:
            run_dir = Path(args.resubmit).resolve()
            s = _resubmit_settings(args, run_dir)
            return _resubmit(s, run_dir, args.dry_run)
        if not args.out:
            raise ValueError("--out RUN_DIR is required")
        run_dir = Path(args.out).resolve()
        if any(c.isspace() for c in str(run_dir)):  # #SBATCH --output takes no quoting
            raise ValueError(
                f"--out {run_dir}: a path with spaces cannot go into #SBATCH lines. Fix: "
                "choose a run directory without spaces"
            )
        s = _settings(args)
        old = settings.load(run_dir)
        if old is not None:
            why = settings.differences(old, s)
            reason = (
                (
                    "it holds a submission with " + "; ".join(why) + ", and its shards would mix with "
                    "this one's"
                )
                if why
                else "it already holds this submission"
            )
            raise ValueError(
                f"{run_dir}: refused, {reason}. Fix: `sysgen slurm --resubmit {run_dir}` to "
                "run its unfinished shards, or a new --out for a new run"
            )
        problem = None if args.allow_fs else store_fs_problem(run_dir)
        if problem:
            raise ValueError(problem)
        if not args.dry_run:
            require_sbatch()  # before anything is written, so the same command can be given again
            settings.save(run_dir, s)
        try:
            submit(s, run_dir, list(range(s.shards)), args.dry_run)
        except SlurmError:
            if not args.dry_run and not submissions(run_dir):  # nothing submitted: as if never asked
                (run_dir / settings.FILE).unlink(missing_ok=True)
            raise
        return 0
    except ValueError as e:
        print(f"sysgen slurm: error: {e}", file=sys.stderr)
        return 2
    except (SlurmError, OSError) as e:
        print(f"sysgen slurm: error: {e}", file=sys.stderr)
        return 1


def _resubmit(s: SlurmSettings, run_dir: Path, dry_run: bool) -> int:
    from sysgen.slurm.status import live_finishing_jobs, live_tasks, shard_status
    from sysgen.slurm.submit import submit

    live = live_tasks(run_dir)
    finishing = live_finishing_jobs(run_dir)
    if finishing and not live:
        raise ValueError(
            f"{run_dir}: its finishing job {', '.join(finishing)} is still pending or running. "
            "Fix: wait for it (sysgen status), or scancel it, then resubmit"
        )
    if live:
        active = ", ".join(map(str, sorted(live)))
        raise ValueError(
            f"{run_dir}: shards {active} are still pending or running in Slurm; a second "
            "task on a shard would be refused by its store lock. Fix: wait for them (sysgen "
            "status), or scancel them, then resubmit"
        )
    todo = [
        i
        for i in range(s.shards)
        if shard_status(run_dir / "shards" / str(i), None, True)["state"] != "finished"
    ]
    if not todo:
        print(
            f"sysgen slurm: every shard of {run_dir} is finished; submitting the finishing job only",
            file=sys.stderr,
        )
    if not dry_run:
        settings.save(run_dir, s)
    print(
        f"sysgen slurm: resubmitting {len(todo)} of {s.shards} shards ({', '.join(map(str, todo))}); each "
        "resumes from its own store",
        file=sys.stderr,
    )
    submit(s, run_dir, todo, dry_run)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from sysgen.slurm.status import render, status

    try:
        st = status(Path(args.run_dir).resolve())
    except ValueError as e:
        print(f"sysgen status: error: {e}", file=sys.stderr)
        return 2
    print(orjson.dumps(st, option=orjson.OPT_INDENT_2).decode() if args.json else render(st))
    return 0


def register(sub, add_run_parser: Callable) -> None:
    """Add `slurm` and `status` to the CLI's subparsers; `add_run_parser` gives the run options."""
    scratch = argparse.ArgumentParser(add_help=False).add_subparsers()
    add_run_parser(scratch)
    run = scratch.choices["run"]
    for action in run._actions:  # INPUTS and --out are optional here: --resubmit and --finish need neither
        if action.dest == "inputs":
            action.nargs = "*"
        if action.dest == "out":
            action.required = False
            action.help = "the run directory on the shared file system: shards/, merged/, logs/, scripts/"
    p = sub.add_parser(
        "slurm",
        parents=[run],
        conflict_handler="resolve",
        help="run as a Slurm job array of --shard tasks plus a finishing job (merge, report, export)",
        description=__doc__,
    )
    g = p.add_argument_group("Slurm")
    g.add_argument(
        "--shards",
        type=whole(1, MAX_SHARDS),
        default=None,
        help="N: shards (array tasks); default 4x --concurrent, so a lost task costs little and "
        "slow shards balance out",
    )
    g.add_argument(
        "--concurrent",
        type=whole(1, MAX_SHARDS),
        default=None,
        help=f"M: tasks running at once (the array's %%M; default {CONCURRENT})",
    )
    g.add_argument("--partition", default=None)
    g.add_argument("--gpus-per-task", type=whole(1, 1024), default=None, help="GPUs per task (--gres=gpu:K)")
    g.add_argument("--cpus-per-task", type=whole(1, 100_000), default=None)
    g.add_argument("--mem", default=None, help="memory per task, e.g. 64G")
    g.add_argument("--time", default=None, help="time limit per task, e.g. 4:00:00")
    g.add_argument(
        "--signal-s",
        type=whole(1, 86_400),
        default=None,
        help="seconds before the time limit when a task stops cleanly and requeues itself "
        f"(default {SIGNAL_S})",
    )
    g.add_argument(
        "--sbatch",
        action="append",
        metavar="OPTION",
        help="an extra #SBATCH option, e.g. --sbatch=--account=proj (repeatable)",
    )
    g.add_argument(
        "--engine-cmd",
        default=None,
        help="command starting a server on the task's node (e.g. an SGLang server with "
        "--dp-size 8), stopped when the shard ends; with --engine-ready",
    )
    g.add_argument("--engine-ready", default=None, help="URL answering once --engine-cmd's server is up")
    g.add_argument(
        "--allow-fs",
        action="store_true",
        help="submit even where the run directory's file system is known to break SQLite locks",
    )
    g.add_argument("--dry-run", action="store_true", help="print the scripts and sbatch commands only")
    g.add_argument(
        "--resubmit",
        metavar="RUN_DIR",
        default=None,
        help="run the unfinished shards of RUN_DIR again with its saved settings, then the finishing job",
    )
    g.add_argument("--finish", metavar="RUN_DIR", default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_slurm)

    st = sub.add_parser("status", help="progress across the shards of a `sysgen slurm` run (read-only)")
    st.add_argument("run_dir", help="the --out of `sysgen slurm`")
    st.add_argument("--json", action="store_true", help="machine-readable: finished, merged, per_shard...")
    st.set_defaults(func=cmd_status)
