"""What the user typed as inputs, expanded into sources: files, folders, glob patterns, Hugging Face
`save_to_disk` folders and `hf:OWNER/NAME` hub datasets.

Each source gets a name that is unique among the sources, readable and stable: the file name without
its extension, or, where two sources share it (every hub download is `train.jsonl` or
`train-0000x-of-0000n.parquet`), the shortest path suffix that tells them apart
(`mt_bench/question`, `vicuna_bench/question`). Names are ids (`<source>:<line>`) and resume keys,
so a run may pin the names an earlier run into the same output directory gave (`previous`).
"""

from __future__ import annotations

import errno
import glob
import logging
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sysgen.datasets.errors import DatasetError

log = logging.getLogger(__name__)

FILE_EXTENSIONS = (".jsonl", ".json", ".parquet", ".jsonl.gz", ".json.gz", ".csv", ".tsv")
HF_PREFIX = "hf:"
# Files a Hugging Face dataset folder holds beside its data: metadata, never rows.
_METADATA = frozenset({"dataset_info.json", "dataset_infos.json", "state.json", "dataset_dict.json"})
# What sysgen itself writes into an output folder: never read back as input.
_OUTPUTS = frozenset({"data.jsonl", "dropped.jsonl", "stats.json", "eval.json", "judgements.jsonl"})
# A folder holding one of these is a sysgen run's output folder.
_RUN_MARKERS = ("store.db", "stats.json")


@dataclass(frozen=True, slots=True)
class Source:
    """`path` is the file (or save_to_disk folder, or `hf:NAME`) the rows come from; `kind` is the
    file extension, `hf_disk` or `hf_hub`."""

    path: str
    name: str
    kind: str

    @property
    def is_file(self) -> bool:
        return not self.kind.startswith("hf_")


def extension(name: str) -> str:
    """The accepted extension `name` ends with, or ""."""
    return next((e for e in sorted(FILE_EXTENSIONS, key=len, reverse=True) if name.endswith(e)), "")


def is_saved_dataset(path: str | Path) -> bool:
    """A folder written by `datasets`' save_to_disk (a Dataset or a DatasetDict)."""
    p = Path(path)
    return (p / "dataset_dict.json").is_file() or (
        (p / "state.json").is_file() and (p / "dataset_info.json").is_file()
    )


def is_run_output(path: str | Path) -> bool:
    """A file sysgen writes (data.jsonl, dropped.jsonl, ...) inside a sysgen run's output folder."""
    p = Path(path)
    return p.name in _OUTPUTS and any((p.parent / m).is_file() for m in _RUN_MARKERS)


def resolve_inputs(inputs: Sequence[str | Path], previous: dict[str, str] | None = None) -> list[Source]:
    """Every input expanded to sources in a stable order; DatasetError naming the input and the fix
    when one cannot be read. The same file reached twice (a glob and its own name) is read once.
    `previous` maps a source path (absolute) to the name an earlier run gave it; kept where unique."""
    found: list[tuple[str, str]] = []  # (path, kind)
    seen: set[str] = set()
    for raw in inputs:
        for path, kind in _expand(str(raw)):
            ident = path if kind == "hf_hub" else os.path.realpath(path)
            if ident in seen:
                log.info("%s is among the inputs more than once; it is read once", path)
                continue
            seen.add(ident)
            found.append((path, kind))
    return named([Source(p, "", k) for p, k in found], previous)


def named(sources: Sequence[Source], previous: dict[str, str] | None = None) -> list[Source]:
    """`sources` (resolved already) with their names, pinning the names an earlier run gave."""
    names = _names([s.path for s in sources], previous or {})
    return [Source(s.path, n, s.kind) for s, n in zip(sources, names, strict=True)]


def source_names(inputs: Sequence[str | Path]) -> dict[str, str]:
    """{source path: source name} for these inputs."""
    return {s.path: s.name for s in resolve_inputs(inputs)}


def _expand(raw: str) -> list[tuple[str, str]]:
    if raw.startswith(HF_PREFIX):
        name = raw[len(HF_PREFIX) :].strip("/")
        if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name):
            raise DatasetError(
                f"{raw}: not a Hugging Face dataset name. Fix: write hf:OWNER/NAME, e.g. hf:LDJnr/Capybara",
                kind="argument",
            )
        return [(HF_PREFIX + name, "hf_hub")]
    if not os.path.lexists(raw) and glob.has_magic(raw):
        matches = sorted(glob.glob(raw, recursive=True), key=_natural)
        if not matches:
            raise DatasetError(
                f"{raw}: the pattern matches no file. Fix: check the pattern (quote it so "
                "the shell passes it to sysgen)",
                kind="argument",
            )
        out: list[tuple[str, str]] = []
        own = [m for m in matches if is_run_output(m)]
        if own:
            log.info(
                "%s: left out %d output file(s) of a sysgen run (%s%s): a run never reads its own or "
                "another run's outputs through a pattern",
                raw,
                len(own),
                ", ".join(own[:3]),
                ", …" if len(own) > 3 else "",
            )
        for m in matches:
            if m in own:
                continue
            if os.path.isdir(m) and not is_saved_dataset(m):
                continue  # `data/*` also matches folders; their files are matched by `data/**/*`
            if os.path.isdir(m) or (extension(os.path.basename(m)) and os.path.basename(m) not in _METADATA):
                out.extend(_expand(m))
        if not out:
            raise DatasetError(
                f"{raw}: the pattern matches no data file (only {', '.join(matches[:3])}"
                f"{', …' if len(matches) > 3 else ''}). Fix: match files ending in "
                f"{', '.join(FILE_EXTENSIONS)}",
                kind="argument",
            )
        return out
    _check_exists(raw)
    if os.path.isdir(raw):
        return [(_abs(raw), "hf_disk")] if is_saved_dataset(raw) else _folder(raw)
    kind = extension(os.path.basename(raw))
    if not kind:
        raise DatasetError(
            f"{raw}: unknown file type. Fix: give a file ending in one of "
            f"{', '.join(FILE_EXTENSIONS)}, a folder of them, or a save_to_disk folder",
            kind="argument",
        )
    if not os.path.isfile(raw):
        raise DatasetError(f"{raw}: not a regular file. Fix: pass the data files themselves", kind="argument")
    return [(_abs(raw), kind)]


def _check_exists(raw: str) -> None:
    try:
        os.stat(raw)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise DatasetError(
                f"{raw}: a symbolic link loop (the link points back at itself). Fix: point "
                "the link at the real file",
                kind="argument",
            ) from None
        if os.path.islink(raw):
            raise DatasetError(
                f"{raw}: a symbolic link to {os.readlink(raw)}, which does not exist. Fix: "
                "point the link at the real file",
                kind="argument",
            ) from None
        if e.errno == errno.EACCES:
            raise DatasetError(f"{raw}: permission denied. Fix: make it readable", kind="argument") from None
        raise DatasetError(f"{raw}: no such file or folder. Fix: check the path", kind="argument") from None


def _folder(root: str) -> list[tuple[str, str]]:
    """Every data file under `root`, in natural path order (shard 2 before shard 10); a saved
    dataset inside is one source. Hidden entries and sysgen's own outputs are skipped; other
    files are named once in the log, so nothing is left out without a word."""
    out: list[tuple[str, str]] = []
    skipped: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted((d for d in dirnames if not d.startswith(".")), key=_natural)
        keep = []
        for d in dirnames:
            sub = os.path.join(dirpath, d)
            if is_saved_dataset(sub):
                out.append((_abs(sub), "hf_disk"))
            else:
                keep.append(d)
        dirnames[:] = keep
        for f in sorted(filenames, key=_natural):
            if f.startswith(".") or f in _METADATA or f in _OUTPUTS:
                continue
            kind = extension(f)
            if kind and os.path.isfile(os.path.join(dirpath, f)):
                out.append((_abs(os.path.join(dirpath, f)), kind))
            else:
                skipped.append(os.path.relpath(os.path.join(dirpath, f), root))
    if skipped:
        log.info(
            "%s: skipped %d file(s) that are not data (%s%s)",
            root,
            len(skipped),
            ", ".join(skipped[:5]),
            ", …" if len(skipped) > 5 else "",
        )
    if not out:
        raise DatasetError(
            f"{root}: a folder with no data file in it. Fix: put files ending in "
            f"{', '.join(FILE_EXTENSIONS)} there, or pass the files",
            kind="argument",
        )
    out.sort(key=lambda pk: _natural(pk[0]))
    return out


def _abs(path: str) -> str:
    # Absolute without resolving links: a link's own name (a Hugging Face cache is all links to
    # blobs named by hash) is the readable one.
    return os.path.abspath(path)


def _natural(s: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _parts(path: str) -> list[str]:
    """Path components, the last one without its data extension."""
    if path.startswith(HF_PREFIX):
        return [p for p in path[len(HF_PREFIX) :].split("/") if p]
    parts = [p for p in Path(path).parts if p not in ("/", "")]
    last = parts[-1]
    parts[-1] = last[: len(last) - len(extension(last))] or last
    return parts


def _names(paths: list[str], previous: dict[str, str]) -> list[str]:
    """The shortest distinguishing path suffix of each; names an earlier run gave are kept when
    they are still unique."""
    pinned = {p: previous[p] for p in paths if p in previous}
    if len(set(pinned.values())) != len(pinned):
        pinned = {}
    names = dict(pinned)
    free = [p for p in paths if p not in pinned]
    left = _shortest_suffixes({p: _parts(p) for p in free}, set(pinned.values()), names)
    # Same path but for the extension (a/train.jsonl beside a/train.parquet): keep the extension.
    left = _shortest_suffixes(
        {p: [x for x in Path(p).parts if x != "/"] for p in left}, set(names.values()), names
    )
    for p in left:
        names[p] = p
    return [names[p] for p in paths]


def _shortest_suffixes(parts: dict[str, list[str]], taken: set[str], names: dict[str, str]) -> list[str]:
    """Give each path the shortest suffix no other path in `parts` shares and not in `taken`;
    return the paths no suffix tells apart."""
    left = list(parts)
    depth = max((len(v) for v in parts.values()), default=0)
    for k in range(1, depth + 1):
        counts = Counter("/".join(parts[p][-k:]) for p in parts)
        rest = []
        for p in left:
            cand = "/".join(parts[p][-k:])
            if counts[cand] == 1 and cand not in taken:
                names[p] = cand
                taken.add(cand)
            else:
                rest.append(p)
        left = rest
    return left
