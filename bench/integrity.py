"""What proving the outputs by content costs a resume (engine/sink_log.py).

`python -m bench.integrity [--lines 800000] [--line-bytes 1500] [--json FILE]`

Writes a sink of LINES lines through a Store (commits of 10,000 lines, as a run commits), then
times re-opening it three ways:
- untouched_s: the file as the store left it: only the last commit's segment is hashed;
- touched_s: the same bytes with a new mtime (as after a copy, an editor or a killed run): every
  committed byte is hashed, segment by segment;
- length_only_s: the old check (stat and truncate), for comparison.
Each is the best of three (the file is in the page cache after the first read: a cold cache
adds the disk's read time to touched_s).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from engine.store import Store

COMMIT = 10_000


def build(db: Path, sink: Path, lines: int, line_bytes: int) -> int:
    pad = b"x" * max(0, line_bytes - 40)
    with Store.open(db, commit_every=COMMIT + 1) as st:
        st.add_sink("data", sink)
        for i in range(lines):
            line = b'{"id": "in:%d", "t": "%s"}\n' % (i, pad)
            st.finish_item(i.to_bytes(8, "big"), None, (("data", line),))
            if i % COMMIT == COMMIT - 1:
                st.flush()
        st.flush()
    return sink.stat().st_size


def best_of(fn, n: int = 3) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def measure(workdir: Path, lines: int, line_bytes: int) -> dict:
    db, sink = workdir / "store.db", workdir / "data.jsonl"
    size = build(db, sink, lines, line_bytes)

    def reopen() -> None:
        with Store.open(db) as st:
            st.add_sink("data", sink)

    def length_only() -> None:  # what add_sink did before digests: a stat and a truncate
        with Store.open(db) as st:
            st.get_meta("sink:data")
            sink.stat()
            with open(sink, "ab") as f:
                f.truncate(size)

    untouched = best_of(reopen)

    def touched() -> None:
        os.utime(sink)  # a new mtime: the recorded stat no longer matches
        reopen()

    res = {
        "lines": lines,
        "bytes": size,
        "commits": -(-lines // COMMIT),
        "untouched_s": round(untouched, 4),
        "touched_s": round(best_of(touched), 4),
        "length_only_s": round(best_of(length_only), 4),
    }
    res["touched_gb_per_s"] = round(size / res["touched_s"] / 1e9, 2)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.integrity",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--lines", type=int, default=800_000)
    ap.add_argument("--line-bytes", type=int, default=1500)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        res = measure(Path(tmp), args.lines, args.line_bytes)
    print(json.dumps(res, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
