"""Has an input file changed since the last run into this output directory?

Done markers name rows by source and line, so a file edited in place (a bad row fixed, rows
reordered, the file regenerated) would have its new rows taken for finished old ones. Each run
records every input's size, mtime, ctime and content hash; the next run compares:
- same size, mtime and ctime: unchanged, nothing is read. ctime cannot be set back by `touch -r`,
  `rsync -t` or `tar x`, which restore the mtime of a file edited in place; when only the ctime
  differs (such a tool, a chmod, a copy), the file is hashed to decide;
- grown, the old bytes hash as before, and they ended in a newline: rows were appended, the
  finished ones still hold (without that newline the first new bytes extend the old last row);
- anything else: changed. The caller then restarts the outputs; every unchanged row is answered
  from the request store (its requests have the same keys), so only changed rows cost engine time.
"""

from __future__ import annotations

import os
from pathlib import Path

import xxhash

from sysgen.datasets import source_name

_CHUNK = 1 << 22


def digest(path: str | Path, prefix: int | None = None) -> tuple[str, str | None]:
    """(xxh3_128 of the whole file, of its first `prefix` bytes or None), in one pass."""
    whole, head = xxhash.xxh3_128(), None
    done = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            if prefix is not None and head is None and done + len(chunk) >= prefix:
                cut = prefix - done
                whole.update(chunk[:cut])
                head = whole.hexdigest()
                whole.update(chunk[cut:])
            else:
                whole.update(chunk)
            done += len(chunk)
    if prefix is not None and head is None:  # prefix == 0 on an empty file, or past the end
        head = whole.hexdigest() if done == prefix else None
    return whole.hexdigest(), head


def _folder_identity(path: str) -> dict:
    """A save_to_disk folder: its files' names, sizes and mtimes (its Arrow files may be GBs; a
    rewrite changes their mtimes, which is what is trusted here)."""
    listing, size, mtime = [], 0, 0
    for dirpath, _, files in os.walk(path):
        for f in sorted(files):
            st = os.stat(os.path.join(dirpath, f))
            listing.append((os.path.relpath(os.path.join(dirpath, f), path), st.st_size, st.st_mtime_ns))
            size, mtime = size + st.st_size, max(mtime, st.st_mtime_ns)
    digest_ = xxhash.xxh3_128_hexdigest(repr(sorted(listing)).encode())
    return {"size": size, "mtime_ns": mtime, "xxh3": digest_}


def compare(
    recorded: dict[str, dict], paths: tuple[str, ...], names: dict[str, str] | None = None
) -> tuple[list[str], dict[str, dict]]:
    """(inputs that changed other than by appending, the identities to record now), keyed by
    source name as the done markers are (`names`: source path -> name; else the file's own).
    A hf:NAME dataset has no identity here: the Hugging Face cache pins its revision."""
    changed: list[str] = []
    now = dict(recorded)  # inputs of earlier runs that are not among these stay recorded
    for path in paths:
        name = (names or {}).get(path) or source_name(path)
        if path.startswith("hf:"):
            continue
        if os.path.isdir(path):
            ident = _folder_identity(path)
            if name in recorded and recorded[name] != ident:
                changed.append(path)
            now[name] = ident
            continue
        st = os.stat(path)
        old = recorded.get(name)
        if (
            old
            and old["size"] == st.st_size
            and old["mtime_ns"] == st.st_mtime_ns
            and old.get("ctime_ns") == st.st_ctime_ns
        ):
            continue  # recorded as it is
        grown = old is not None and st.st_size >= old["size"]
        full, head = digest(path, old["size"] if grown else None)
        appended = (
            grown and head == old["xxh3"] and (st.st_size == old["size"] or _ends_line(path, old["size"]))
        )
        if old is not None and not appended:
            changed.append(path)
        now[name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "xxh3": full}
    return changed, now


def _ends_line(path: str | Path, size: int) -> bool:
    """Whether the first `size` bytes end with a newline (or are empty): only then do appended
    bytes start a new row instead of extending the last old one."""
    if size == 0:
        return True
    with open(path, "rb") as f:
        f.seek(size - 1)
        return f.read(1) == b"\n"
