"""A --limit lowered below what an output directory already holds is refused, before anything runs.

The records past the new limit are finished work: deleting them would lose it, and keeping them
while counting only `limit` rows read made stats.json say `accounted: false`. So the run stops with
one line saying how many are done and what to do; nothing in --out changes.
"""

from __future__ import annotations

import orjson

from engine.store import Store
from sysgen.config import RunConfig
from sysgen.datasets.errors import DatasetError


def check_limit(store: Store, cfg: RunConfig, fingerprint: str) -> None:
    """DatasetError (an argument error) when --limit is below the instances an earlier run with the
    same configuration finished in this store."""
    if cfg.limit is None:
        return
    raw = store.get_meta("watermark")
    wm = orjson.loads(raw) if raw is not None else None
    ours = isinstance(wm, dict) and wm.get("fingerprint") == fingerprint and "seq" in wm
    done = int(wm["seq"]) + 1 if ours else 0  # the watermark names the last position done, from 0
    if done > cfg.limit:
        raise DatasetError(
            f"--limit {cfg.limit:,} is below the {done:,} instances {cfg.out} already holds "
            f"from an earlier run of this configuration; nothing was changed. Fix: pass "
            f"--limit {done:,} or more (or no --limit) to resume, or a new --out for a "
            "smaller run",
            kind="argument",
        )
