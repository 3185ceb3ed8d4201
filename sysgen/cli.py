"""`sysgen run | merge | repair | slurm | status | report | eval | export`.

The environment is read here and nowhere else."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import errno
import logging
import os
import sys
import time
import types
import typing
from pathlib import Path

from engine.backend import Backend, EngineAuthError, EngineConfigError, EngineDied, EngineDown, FailureStreak
from engine.backends.model_cache import ModelNotFound
from engine.canary import ConstraintIgnored
from engine.store import SinkMismatch, Store, StoreError
from sysgen.backend_factory import make_backend
from sysgen.cli_args import OneLineParser, run_type
from sysgen.cli_eval import register, report_after_run
from sysgen.config import RunConfig, config_fields
from sysgen.datasets import DatasetError
from sysgen.os_errors import os_error_line
from sysgen.run import stats
from sysgen.run.merge import add_merge_parser
from sysgen.run.pipeline import RunInterrupted, run_stream
from sysgen.run.plan import RunPlan, plan_run
from sysgen.run.repair import add_repair_parser
from sysgen.slurm.cli import register as register_slurm

log = logging.getLogger("sysgen")


def _arg_type(f: dataclasses.Field):
    hint = typing.get_type_hints(RunConfig)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if args and (typing.get_origin(hint) in (typing.Union, types.UnionType)) else hint
    if typing.get_origin(base) is typing.Literal:
        return str, typing.get_args(base)
    return (base if base in (int, float, str) else str), None


class _DefaultsFormatter(argparse.HelpFormatter):
    """Append "(default: X)" where a help text does not already say its default and there is one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_ = action.help or ""
        if "default" in help_ or action.default in (None, "", argparse.SUPPRESS) or not action.option_strings:
            return help_
        return help_ + " (default: %(default)s)"


def add_run_parser(sub) -> None:
    p = sub.add_parser(
        "run",
        help="generate system messages and new answers for SFT files",
        formatter_class=_DefaultsFormatter,
    )
    for f in config_fields():
        help_ = f.metadata.get("help", "")
        if f.metadata.get("positional"):
            p.add_argument(f.name, nargs="+", help=help_)
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_)
            continue
        typ, choices = _arg_type(f)
        p.add_argument(
            flag,
            type=run_type(f.name, typ),
            choices=choices,
            default=f.default,
            help=help_,
            required=f.metadata.get("required", False),
        )
    p.add_argument(
        "--api-key",
        default=None,
        help="key for --engine openai, sglang_http or vllm_http (default: env OPENAI_API_KEY; "
        "for vllm_http first VLLM_API_KEY, the variable a vLLM server takes its key from)",
    )
    p.set_defaults(func=cmd_run)


def _config_from_args(args: argparse.Namespace) -> RunConfig:
    kw = {f.name: getattr(args, f.name) for f in config_fields()}
    kw["inputs"] = tuple(kw["inputs"])
    return RunConfig(**kw)


def env_api_key(engine: str) -> str | None:
    """The API key from the environment when --api-key is not given."""
    if engine == "vllm_http" and os.environ.get("VLLM_API_KEY"):
        return os.environ["VLLM_API_KEY"]
    return os.environ.get("OPENAI_API_KEY")


def _dataset_error_hint(e: Exception, resume_hint: str) -> str:
    """What to do after a DatasetError mid-run, by what is at fault (the resume hint only where
    re-running the same command is the way on)."""
    kind = getattr(e, "kind", "argument")
    if kind == "row":
        return (
            f"Everything before that row is committed; {resume_hint} once the row is fixed (or without "
            "--strict to record it and go on)."
        )
    if kind == "file":
        return (
            f"Everything read before it is committed; {resume_hint} once the file is fixed (or without "
            "--strict to record it as a bad file and go on)."
        )
    return "Fix the command line (finished work is kept in the output directory)."


async def _run_async(plan: RunPlan, backend: Backend, store: Store) -> dict:
    async with backend:
        return await run_stream(
            plan.cfg, backend, store, plan.out, progress_enabled=plan.cfg.progress, sources=plan.sources
        )


def _event_loop_runner():
    try:
        import uvloop  # optional (not on Windows)

        return uvloop.run
    except ImportError:
        return asyncio.run


RESUME_HINT = "re-run the same command to resume; finished work is kept"


def _standin_env() -> dict[str, str | None]:
    """The stand-in engine (tests and benchmarks only) takes its latency and injected faults from
    the environment, so they never appear among a real run's flags."""
    return {
        "delay": os.environ.get("SYSGEN_STANDIN_DELAY"),
        "faults": os.environ.get("SYSGEN_STANDIN_FAULTS"),
        "tokenizer": os.environ.get("SYSGEN_STANDIN_TOKENIZER"),
    }


def _open_run(args: argparse.Namespace) -> tuple[RunPlan, Backend, Store]:
    """Parse, plan (every flag and path checked before the store is opened), then the engine and
    the store; ValueError, OSError, StoreError, ModelNotFound or EngineDied before any instance is read."""
    plan = plan_run(_config_from_args(args))
    plan.out.mkdir(parents=True, exist_ok=True)
    cfg = plan.cfg
    backend = make_backend(
        cfg.engine,
        model=cfg.model,
        url=cfg.url,
        api_key=args.api_key or env_api_key(cfg.engine),
        gpu_profile=cfg.gpu_profile,
        max_batch=cfg.max_batch,
        fp8=cfg.fp8,
        max_inflight=cfg.max_inflight,
        standin=_standin_env(),
        timeout_s=cfg.timeout_s,
        openai_server=cfg.openai_server,
        kv_cache_gb=cfg.kv_cache_gb,
        deterministic=cfg.deterministic,
    )
    return plan, backend, Store.open(plan.out / "store.db")


_ACCESS_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS)


def _stopped(e: Exception) -> tuple[str, int]:
    """(message, exit code) for an error that stopped a run after it started."""
    if isinstance(e, SinkMismatch):  # outputs edited or a foreign store.db: nothing was changed
        return f"sysgen run: error: {e}", 2
    cause = e.__cause__
    if isinstance(e, StoreError) and isinstance(cause, OSError) and cause.errno in _ACCESS_ERRNOS:
        # an output the store's writer may not open or write (a read-only data.jsonl): the user's to fix
        return f"sysgen run: error: {os_error_line(cause)}; {RESUME_HINT}", 2
    if isinstance(e, StoreError):
        return (
            f"sysgen: store error: {e}\nThe store is intact up to the last commit; {RESUME_HINT} "
            "once the cause (e.g. a full disk) is fixed."
        ), 1
    if isinstance(e, EngineAuthError):
        return f"sysgen: stopped: {e}.\nNothing was dropped; fix the credentials, then {RESUME_HINT}.", 1
    if isinstance(e, EngineConfigError):  # a wrong --url, a server set up wrong: configuration, not an outage
        return f"sysgen run: error: {e}", 2
    if isinstance(e, EngineDied):
        stopped = isinstance(e, (EngineDown, FailureStreak, ConstraintIgnored))
        what = "stopped" if stopped else "the engine died"
        return (
            f"sysgen: {what}: {e}\nEverything finished before is committed; {RESUME_HINT} "
            "once the engine is fixed."
        ), 1
    return f"sysgen run: error: {e}\n{_dataset_error_hint(e, RESUME_HINT)}", 2


def _print_summary(st: dict, counters: dict, out: Path) -> None:
    if st.get("other_sources"):
        print(
            f"sysgen: warning: {out} also holds outputs of other inputs ({', '.join(st['other_sources'])}) "
            "from an earlier run, counted below. Fix: give each dataset its own --out",
            file=sys.stderr,
        )
    elif not st["accounted"]:
        print(
            f"sysgen: warning: {out} holds {st['input']:,} output lines but the inputs gave "
            f"{st['rows_read']:,} rows (stats.json: accounted=false)",
            file=sys.stderr,
        )
    sm = counters["scheduler"]
    rate = "n/a" if st["p1_parse_rate"] is None else f"{100 * st['p1_parse_rate']:.1f}%"
    earlier = counters.get("already_done")
    done = f"{earlier:,} already done by an earlier run, " if earlier else ""
    print(
        f"sysgen: {st['input']:,} instances → {st['kept']:,} kept "
        f"({st['funnel_pct']['p4_kept']:.1f}%); {done}P1 parse rate {rate}; "
        f"engine calls {sm['engine_calls']:,}, store hits {sm['hits']:,}; "
        f"{sm['completion_tokens']:,} output tokens; wrote {out}/data.jsonl",
        file=sys.stderr,
    )


def cmd_run(args: argparse.Namespace) -> int:
    """parse → plan → run → print."""
    t0 = time.monotonic()
    try:
        plan, backend, store = _open_run(args)
    except (ValueError, OSError, StoreError, ModelNotFound, EngineDied) as e:
        print(f"sysgen run: error: {e}", file=sys.stderr)
        return 2
    cfg, out = plan.cfg, plan.out
    with store:  # closed on any error from here on, a full disk at the stale mark included
        stats.mark_stale(
            out,
            "a run started after these figures were written; they are rewritten when it finishes or stops",
        )
        try:
            counters = _event_loop_runner()(_run_async(plan, backend, store))
        except RunInterrupted as e:
            c = e.args[0]
            # true figures of the outputs, marked unfinished
            stats.write_run(out, cfg, backend, {**c, "interrupted": True}, None, time.monotonic() - t0)
            print(
                f"\nsysgen: interrupted after {c['kept'] + c['dropped']:,} instances this run; "
                f"{RESUME_HINT}.",
                file=sys.stderr,
            )
            return 130
        except (StoreError, EngineAuthError, EngineDied, DatasetError) as e:
            msg, rc = _stopped(e)
            print(msg, file=sys.stderr)
            return rc
    st = stats.write_run(out, cfg, backend, counters, counters["rows_read"], time.monotonic() - t0)
    _print_summary(st, counters, out)
    sm = counters["scheduler"]
    if not st["kept"] and sm["failures"] and not sm["engine_calls"]:  # every engine request failed
        print(
            f"sysgen: error: kept nothing: all {sm['failures']:,} engine requests of this run failed; "
            f"the last: {sm['last_failure']}",
            file=sys.stderr,
        )
        return 1
    if cfg.report:
        report_after_run(out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="sysgen", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    add_run_parser(sub)
    add_merge_parser(sub)
    add_repair_parser(sub)
    register_slurm(sub, add_run_parser)  # `slurm` (takes the run options) and `status`
    register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # a usage error (one line, sysgen/cli_args.py) or --help: the exit status
        return e.code if isinstance(e.code, int) else 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not args.verbose:  # HTTP libraries log a line per request at INFO (httpx did: 3 per row)
        for name in ("httpx", "httpcore", "aiohttp.access", "aiohttp.client"):
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except OSError as e:  # unreadable input, read-only output, a full disk: one line, never a traceback
        kept = " (finished work is kept; the same command resumes)" if args.command == "run" else ""
        print(f"sysgen {args.command}: error: {os_error_line(e)}{kept}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
