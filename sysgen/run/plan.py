"""The run-setup stage of `sysgen run`: what the run reads and writes, resolved once and checked
once, before anything in --out is created, opened or emptied; and the settings of the phases and
the scheduler, derived from the run configuration.

Flags are checked by `RunConfig` itself (its `__post_init__`); what needs the file system is
checked here: the output directory (sysgen/run/run_checks.py), then the inputs, expanded once
(folders, globs, Hugging Face names), with their format, splits and --columns
(`datasets.preflight`). The sources found here are the ones the run reads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from engine.backend import Backend
from engine.scheduler import SchedulerConfig
from sysgen.config import RunConfig
from sysgen.datasets import Source, preflight
from sysgen.run.phases import PhaseSettings
from sysgen.run.run_checks import check_no_foreign_outputs, check_out, own_outputs_left_out


@dataclass(frozen=True)
class RunPlan:
    """A checked run: `cfg` without the inputs that are its own outputs, and those inputs expanded."""

    cfg: RunConfig
    sources: tuple[Source, ...]

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)


def plan_run(cfg: RunConfig) -> RunPlan:
    """Every check of a run that needs the file system, once; ValueError (a DatasetError for an
    input) naming the path or flag and the fix. Touches nothing."""
    out = Path(cfg.out)
    check_out(out)
    keep = own_outputs_left_out(cfg.inputs, out)
    check_no_foreign_outputs(out)
    sources = preflight(keep, fmt=cfg.format, columns=cfg.columns, split=cfg.split, subset=cfg.subset)
    if len(keep) != len(cfg.inputs):
        cfg = dataclasses.replace(cfg, inputs=tuple(keep))
    return RunPlan(cfg, tuple(sources))


# PhaseSettings fields the run configuration does not hold under the same name: set from the backend.
_FROM_BACKEND = ("model_id", "constrain", "max_context")


def phase_settings(cfg: RunConfig, backend: Backend) -> PhaseSettings:
    """The phases' settings: every PhaseSettings field the run configuration names, plus what the
    backend decides (its model, whether it constrains decoding, its context)."""
    same = {
        f.name: getattr(cfg, f.name) for f in dataclasses.fields(PhaseSettings) if f.name not in _FROM_BACKEND
    }
    caps = backend.capabilities
    return PhaseSettings(
        **same,
        model_id=backend.model_id,
        constrain=cfg.constrain and caps.regex,
        max_context=caps.max_context if cfg.turns == "all" else 0,
    )


def scheduler_config(cfg: RunConfig) -> SchedulerConfig:
    """The scheduler's settings the run's flags name (the same names, and --retry-failed); the rest
    keep the scheduler's defaults."""
    same = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(SchedulerConfig) if hasattr(cfg, f.name)}
    return SchedulerConfig(**same, retry_stored_failures=cfg.retry_failed)
