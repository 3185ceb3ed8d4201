"""`sysgen run | merge | repair | report | eval | export`. The environment is read here and nowhere else."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import sys
import time
import types
import typing
from pathlib import Path

from sysgen.config import RunConfig, config_fields

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
    p = sub.add_parser("run", help="generate system messages and new answers for SFT files",
                       formatter_class=_DefaultsFormatter)
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
        p.add_argument(flag, type=typ, choices=choices, default=f.default, help=help_,
                       required=f.metadata.get("required", False))
    p.add_argument("--api-key", default=None,
                   help="key for --engine openai, sglang_http or vllm_http (default: env OPENAI_API_KEY; "
                        "for vllm_http first VLLM_API_KEY, the variable a vLLM server takes its key from)")
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


def _check_inputs(cfg: RunConfig) -> None:
    """Paths, globs, Hugging Face splits and --columns, checked before anything is opened; a
    DatasetError (a ValueError) says which input and what to do."""
    from sysgen.datasets import preflight

    preflight(cfg.inputs, columns=cfg.columns, split=cfg.split, subset=cfg.subset)


def _dataset_error_hint(e: Exception, resume_hint: str) -> str:
    """What to do after a DatasetError mid-run, by what is at fault (the resume hint only where
    re-running the same command is the way on)."""
    kind = getattr(e, "kind", "argument")
    if kind == "row":
        return (f"Everything before that row is committed; {resume_hint} once the row is fixed (or without "
                "--strict to record it and go on).")
    if kind == "file":
        return (f"Everything read before it is committed; {resume_hint} once the file is fixed (or without "
                "--strict to record it as a bad file and go on).")
    return "Fix the command line (finished work is kept in the output directory)."


async def _run_async(cfg: RunConfig, backend, store, out: Path) -> dict:
    from sysgen.run.pipeline import run_stream

    async with backend:
        return await run_stream(cfg, backend, store, out, progress_enabled=cfg.progress)


def _event_loop_runner():
    try:
        import uvloop

        return uvloop.run
    except ImportError:
        return asyncio.run


def cmd_run(args: argparse.Namespace) -> int:
    from engine.backend import EngineAuthError, EngineDied, EngineDown, FailureStreak
    from engine.backends.model_cache import ModelNotFound
    from engine.store import SinkMismatch, Store, StoreError
    from sysgen import prompts
    from sysgen.backend_factory import make_backend
    from sysgen.datasets import DatasetError
    from sysgen.run import stats
    from sysgen.run.pipeline import RunInterrupted
    from sysgen.run.run_checks import check_run

    try:
        cfg = _config_from_args(args)
        _check_inputs(cfg)
        cfg = check_run(cfg)  # every flag and path checked before the store is opened
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
    except (ValueError, OSError) as e:
        print(f"sysgen run: error: {e}", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    api_key = args.api_key or env_api_key(cfg.engine)
    # The stand-in engine (tests and benchmarks only) takes its latency and injected faults from
    # the environment, so they never appear among a real run's flags.
    standin = {"delay": os.environ.get("SYSGEN_STANDIN_DELAY"),
               "faults": os.environ.get("SYSGEN_STANDIN_FAULTS"),
               "tokenizer": os.environ.get("SYSGEN_STANDIN_TOKENIZER")}
    resume_hint = "re-run the same command to resume; finished work is kept"
    try:
        backend = make_backend(cfg.engine, model=cfg.model, url=cfg.url, api_key=api_key,
                               gpu_profile=cfg.gpu_profile, max_batch=cfg.max_batch, fp8=cfg.fp8,
                               max_inflight=cfg.max_inflight, standin=standin, timeout_s=cfg.timeout_s,
                               openai_server=cfg.openai_server, kv_cache_gb=cfg.kv_cache_gb)
        store = Store.open(out / "store.db")
    except (ValueError, StoreError, ModelNotFound, EngineDied) as e:  # before any instance is read
        print(f"sysgen run: error: {e}", file=sys.stderr)
        return 2

    def run_stats(counters: dict, rows_read: int | None) -> dict:
        counters = dict(counters)
        sources = counters.pop("sources", {})
        config = {**dataclasses.asdict(cfg), "engine": backend.name}  # the resolved engine, never "auto"
        extra = {"model": backend.model_id, "engine": backend.name, "prompts": prompts.digests(),
                 "config": config,
                 "sources": sources,
                 "constrained": cfg.constrain and backend.capabilities.regex, "this_run": counters,
                 "wall_s": round(time.monotonic() - t0, 2)}
        return stats.write(out, extra, rows_read=rows_read, sources=set(sources) or None)

    stats.mark_stale(out, "a run started after these figures were written; they are rewritten when it "
                          "finishes or stops")
    with store:
        try:
            counters = _event_loop_runner()(_run_async(cfg, backend, store, out))
        except RunInterrupted as e:
            c = e.args[0]
            run_stats({**c, "interrupted": True}, None)  # true figures of the outputs, marked unfinished
            print(f"\nsysgen: interrupted after {c['kept'] + c['dropped']:,} instances this run; "
                  f"{resume_hint}.",
                  file=sys.stderr)
            return 130
        except SinkMismatch as e:  # outputs edited or a foreign store.db: nothing was changed
            print(f"sysgen run: error: {e}", file=sys.stderr)
            return 2
        except StoreError as e:
            print(f"sysgen: store error: {e}\nThe store is intact up to the last commit; {resume_hint} "
                  "once the cause (e.g. a full disk) is fixed.", file=sys.stderr)
            return 1
        except EngineAuthError as e:
            print(f"sysgen: stopped: {e}.\nNothing was dropped; fix the credentials, then {resume_hint}.",
                  file=sys.stderr)
            return 1
        except EngineDied as e:
            what = "stopped" if isinstance(e, (EngineDown, FailureStreak)) else "the engine died"
            print(f"sysgen: {what}: {e}\nEverything finished before is committed; {resume_hint} "
                  "once the engine is fixed.", file=sys.stderr)
            return 1
        except DatasetError as e:
            print(f"sysgen run: error: {e}\n{_dataset_error_hint(e, resume_hint)}", file=sys.stderr)
            return 2
    st = run_stats(counters, counters["rows_read"])
    if st.get("other_sources"):
        print(f"sysgen: warning: {out} also holds outputs of other inputs ({', '.join(st['other_sources'])}) "
              "from an earlier run, counted below. Fix: give each dataset its own --out", file=sys.stderr)
    elif not st["accounted"]:
        print(f"sysgen: warning: {out} holds {st['input']:,} output lines but the inputs gave "
              f"{st['rows_read']:,} rows (stats.json: accounted=false)", file=sys.stderr)
    sm = counters["scheduler"]
    rate = "n/a" if st["p1_parse_rate"] is None else f"{100 * st['p1_parse_rate']:.1f}%"
    earlier = counters.get("already_done")
    done = f"{earlier:,} already done by an earlier run, " if earlier else ""
    print(f"sysgen: {st['input']:,} instances → {st['kept']:,} kept "
          f"({st['funnel_pct']['p4_kept']:.1f}%); {done}P1 parse rate {rate}; "
          f"engine calls {sm['engine_calls']:,}, store hits {sm['hits']:,}; "
          f"{sm['completion_tokens']:,} output tokens; wrote {out}/data.jsonl", file=sys.stderr)
    if cfg.report:
        try:
            from sysgen.cli_eval import report_after_run
        except ImportError:
            pass
        else:
            report_after_run(out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sysgen", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    add_run_parser(sub)
    try:
        from sysgen.run.merge import add_merge_parser
    except ImportError:
        pass
    else:
        add_merge_parser(sub)
    from sysgen.run.repair import add_repair_parser

    add_repair_parser(sub)
    try:
        from sysgen.cli_eval import register
    except ImportError:
        pass
    else:
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not args.verbose:  # HTTP libraries log a line per request at INFO (httpx did: 3 per row)
        for name in ("httpx", "httpcore", "aiohttp.access", "aiohttp.client"):
            logging.getLogger(name).setLevel(logging.WARNING)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
