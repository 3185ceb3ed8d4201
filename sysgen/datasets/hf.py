"""Rows out of Hugging Face datasets: a `save_to_disk` folder, or `hf:OWNER/NAME` from the local
Hugging Face cache (or the hub, where it is reachable), through the `datasets` library.

Neither is ever held in memory whole: a saved dataset is memory-mapped Arrow read in slices, a hub
dataset is streamed. Rows are numbered from 1 in the split's order, so `<source>:<row>` is stable
and a resume skips the rows before its start point.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from sysgen.datasets.errors import DatasetError
from sysgen.datasets.inputs import HF_PREFIX, Source

log = logging.getLogger(__name__)
_SLICE = 1024
Row = tuple[int, int, object]


def _datasets():
    try:
        import datasets
    except ImportError as e:
        raise DatasetError(
            "reading Hugging Face datasets needs the `datasets` library. Fix: pip install datasets"
        ) from e
    datasets.logging.set_verbosity_error()  # its progress bars and notices would interleave with ours
    datasets.disable_progress_bars()
    return datasets


def _pick(splits: list[str], split: str | None, where: str) -> str:
    if split is not None:
        if split not in splits:
            raise DatasetError(
                f"{where} has no split {split!r}; it has {', '.join(splits)}. Fix: pass "
                "one of those to --split"
            )
        return split
    if len(splits) != 1:
        raise DatasetError(f"{where} has the splits {', '.join(splits)}. Fix: choose one with --split")
    return splits[0]


def open_source(src: Source, split: str | None = None, subset: str | None = None) -> tuple[Any, str]:
    """(the dataset of the chosen split, split name); DatasetError saying what to pass when the
    split or subset is ambiguous or missing, or the dataset is not to be had."""
    ds_lib = _datasets()
    if src.kind == "hf_disk":
        try:
            ds = ds_lib.load_from_disk(src.path)
        except Exception as e:  # datasets raises several types for a damaged folder
            raise DatasetError(
                f"{src.path}: not a readable save_to_disk folder ({e}). Fix: save it again "
                "with Dataset.save_to_disk",
                kind="file",
            ) from e
        if isinstance(ds, ds_lib.DatasetDict):
            name = _pick(list(ds), split, src.path)
            return ds[name], name
        return ds, split or "train"
    return _open_hub(ds_lib, src.path[len(HF_PREFIX) :], split, subset)


def _open_hub(ds_lib, repo: str, split: str | None, subset: str | None) -> tuple[Any, str]:
    where = f"{HF_PREFIX}{repo}" + (f" (subset {subset})" if subset else "")
    local = _cached_snapshot(repo)
    target = local or repo
    try:
        if split is None:
            splits = list(ds_lib.load_dataset(target, subset, streaming=True))
            split = _pick(splits, None, where)
        return ds_lib.load_dataset(target, subset, split=split, streaming=True), split
    except DatasetError:
        raise
    except ConnectionError as e:
        raise DatasetError(
            f"{where} is not in the local Hugging Face cache and the hub cannot be reached "
            f"({e}). Fix: download it where the hub is reachable (huggingface-cli download "
            f"--repo-type dataset {repo}) and copy the cache here, or pass its files"
        ) from e
    except ValueError as e:  # a bad split or subset name
        raise DatasetError(f"{where}: {e}. Fix: check --split and --subset") from e
    except Exception as e:  # FileNotFoundError, DatasetNotFoundError, and the hub client's own types
        raise DatasetError(
            f"{where} cannot be loaded ({type(e).__name__}: {e}). Fix: check the name "
            "(and --subset), or pass its files"
        ) from e


def _cached_snapshot(repo: str) -> str | None:
    """The local snapshot folder of a hub dataset when the Hugging Face cache holds it: read from
    there with no network at all."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo, repo_type="dataset", local_files_only=True)
    except Exception:  # not cached (LocalEntryNotFoundError), or no huggingface_hub
        return None


def iter_hf_rows(
    src: Source, *, split: str | None = None, subset: str | None = None, start_line: int = 1
) -> Iterator[Row]:
    """(row number, -1, row dict) from `start_line` on."""
    ds, _ = open_source(src, split, subset)
    if src.kind == "hf_disk":
        n = len(ds)
        for at in range(max(start_line, 1) - 1, n, _SLICE):
            cols = ds[at : at + _SLICE]
            keys = list(cols)
            for j, values in enumerate(zip(*(cols[k] for k in keys), strict=True)):
                yield at + j + 1, -1, dict(zip(keys, values, strict=True))
        return
    if start_line > 1:
        ds = ds.skip(start_line - 1)
    for j, row in enumerate(ds, max(start_line, 1)):
        yield j, -1, row
