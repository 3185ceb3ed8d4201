"""What a Slurm submission is, saved in RUN/slurm.json: read back by `--resubmit`, and compared with
any later submission into the same run directory (another N, other run options or other inputs
would mix shards of two different runs, so that is refused)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import orjson

FILE = "slurm.json"
# Options of the array alone: they change where and how fast shards run, never what they write,
# so --resubmit may change them.
ARRAY_FIELDS = (
    "concurrent",
    "partition",
    "gpus_per_task",
    "cpus_per_task",
    "mem",
    "time",
    "signal_s",
    "sbatch",
    "engine_cmd",
    "engine_ready",
    "python",
)


@dataclass
class SlurmSettings:
    inputs: list[str]
    run_args: list[str]  # `sysgen run` options, passed to every task as given (no --out, --shard)
    shards: int
    concurrent: int
    partition: str | None = None
    gpus_per_task: int | None = None
    cpus_per_task: int | None = None
    mem: str | None = None
    time: str | None = None
    signal_s: int = 120
    sbatch: list[str] = field(default_factory=list)  # extra #SBATCH lines
    engine_cmd: str | None = None  # started on the node before the shard runs, stopped after
    engine_ready: str | None = None  # URL answering once that engine is up
    python: str = ""
    input_stamps: dict[str, list[int]] = field(default_factory=dict)  # path -> [size, mtime_ns]

    def identity(self) -> dict:
        """What makes two submissions one run."""
        return {"inputs": self.inputs, "run_args": self.run_args, "shards": self.shards}


def stamps(inputs: list[str]) -> dict[str, list[int]]:
    """Size and mtime of every input that is a plain file, to notice one changed before a resubmit."""
    out = {}
    for p in inputs:
        if os.path.isfile(p):
            st = os.stat(p)
            out[p] = [st.st_size, st.st_mtime_ns]
    return out


def absolute_inputs(inputs: list[str]) -> list[str]:
    """Paths made absolute (tasks may start elsewhere); hf:NAME and globs are kept as given."""
    return [str(Path(p).resolve()) if os.path.exists(p) else p for p in inputs]


def load(run_dir: Path) -> SlurmSettings | None:
    path = run_dir / FILE
    if not path.exists():
        return None
    try:
        raw = orjson.loads(path.read_bytes())
        return SlurmSettings(**raw)
    except (orjson.JSONDecodeError, TypeError) as e:
        raise ValueError(
            f"{path}: not a sysgen slurm record ({e}). Fix: give the run directory a "
            "`sysgen slurm` submission made"
        ) from None


def save(run_dir: Path, s: SlurmSettings) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / (FILE + ".tmp")
    tmp.write_bytes(orjson.dumps(dataclasses.asdict(s), option=orjson.OPT_INDENT_2))
    tmp.replace(run_dir / FILE)


def differences(old: SlurmSettings, new: SlurmSettings) -> list[str]:
    """Why `new` is not the same run as `old` (empty when it is)."""
    why = []
    if old.shards != new.shards:
        why.append(f"--shards {new.shards} (it was submitted with --shards {old.shards})")
    if old.inputs != new.inputs:
        why.append(f"other inputs ({' '.join(new.inputs)}; it has {' '.join(old.inputs)})")
    if old.run_args != new.run_args:
        why.append(
            f"other run options ({' '.join(new.run_args) or 'none'}; it has "
            f"{' '.join(old.run_args) or 'none'})"
        )
    return why


def changed_inputs(s: SlurmSettings) -> list[str]:
    """Inputs whose size or mtime differ from the first submission's."""
    now = stamps(list(s.input_stamps))
    return [p for p, st in s.input_stamps.items() if now.get(p) != st]
