"""`sysgen run | merge | report | eval | export`. The environment is read here and nowhere else."""

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
    p.add_argument("--api-key", default=None, help="key for --engine openai (default: env OPENAI_API_KEY)")
    p.set_defaults(func=cmd_run)


def _config_from_args(args: argparse.Namespace) -> RunConfig:
    kw = {f.name: getattr(args, f.name) for f in config_fields()}
    kw["inputs"] = tuple(kw["inputs"])
    return RunConfig(**kw)


def _check_inputs(cfg: RunConfig) -> None:
    for p in cfg.inputs:
        if not Path(p).is_file():
            raise ValueError(f"input file {p} does not exist. Fix: check the path")


async def _run_async(cfg: RunConfig, backend, store, out: Path) -> dict:
    from sysgen.pipeline import run_stream

    async with backend:
        return await run_stream(cfg, backend, store, out, progress_enabled=cfg.progress)


def _event_loop_runner():
    try:
        import uvloop

        return uvloop.run
    except ImportError:
        return asyncio.run


def cmd_run(args: argparse.Namespace) -> int:
    from engine.backend import EngineDied
    from engine.backends.model_cache import ModelNotFound
    from engine.store import Store, StoreError
    from sysgen import prompts, stats
    from sysgen.backend_factory import make_backend
    from sysgen.datasets import DatasetError
    from sysgen.pipeline import RunInterrupted

    try:
        cfg = _config_from_args(args)
        _check_inputs(cfg)
    except ValueError as e:
        print(f"sysgen run: error: {e}", file=sys.stderr)
        return 2
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
    # The stand-in engine (tests and benchmarks only) takes its latency and injected faults from
    # the environment, so they never appear among a real run's flags.
    standin = {"delay": os.environ.get("SYSGEN_STANDIN_DELAY"),
               "faults": os.environ.get("SYSGEN_STANDIN_FAULTS")}
    resume_hint = "re-run the same command to resume; finished work is kept"
    try:
        backend = make_backend(cfg.engine, model=cfg.model, url=cfg.url, api_key=api_key,
                               gpu_profile=cfg.gpu_profile, max_batch=cfg.max_batch, fp8=cfg.fp8,
                               max_inflight=cfg.max_inflight, standin=standin, kv_cache_gb=cfg.kv_cache_gb)
        store = Store.open(out / "store.db")
    except (ValueError, StoreError, ModelNotFound, EngineDied) as e:  # before any instance is read
        print(f"sysgen run: error: {e}", file=sys.stderr)
        return 2
    with store:
        try:
            counters = _event_loop_runner()(_run_async(cfg, backend, store, out))
        except RunInterrupted as e:
            c = e.args[0]
            print(f"\nsysgen: interrupted after {c['kept'] + c['dropped']:,} instances this run; "
                  f"{resume_hint}.",
                  file=sys.stderr)
            return 130
        except StoreError as e:
            print(f"sysgen: store error: {e}\nThe store is intact up to the last commit; {resume_hint} "
                  "once the cause (e.g. a full disk) is fixed.", file=sys.stderr)
            return 1
        except EngineDied as e:
            print(f"sysgen: the engine died: {e}\nEverything finished before is committed; {resume_hint} "
                  "once the engine is fixed.", file=sys.stderr)
            return 1
        except DatasetError as e:
            print(f"sysgen run: error: {e}\nEverything before that row is committed; {resume_hint} once "
                  "the row is fixed.", file=sys.stderr)
            return 2
    from sysgen.datasets import source_name

    config = {**dataclasses.asdict(cfg), "engine": backend.name}  # the resolved engine, never "auto"
    extra = {"model": backend.model_id, "engine": backend.name, "prompts": prompts.digests(),
             "config": config,
             "sources": {source_name(p): {"path": str(Path(p).resolve())} for p in cfg.inputs},
             "constrained": cfg.constrain and backend.capabilities.regex, "this_run": counters,
             "wall_s": round(time.monotonic() - t0, 2)}
    st = stats.write(out, extra)
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
        from sysgen.merge import add_merge_parser
    except ImportError:
        pass
    else:
        add_merge_parser(sub)
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
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
