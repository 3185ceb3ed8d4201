"""Where a run starts again and which items are already done, without reading finished input twice
and without holding every key in memory: the InputStream (the resolved sources, read from a
position) and the Checkpoint (what the store says is done), opened together by Resume.open, which
also takes inputs a setup stage has already resolved (`sources`, with previous_names).

- The fingerprint names what makes outputs comparable (settings, prompt texts, format, shard). A
  changed fingerprint empties the outputs; stored requests whose own inputs did not change are
  still reused, because request keys are independent of it.
- An item's done marker is keyed fingerprint + source + line, big-endian, so markers are appended
  in key order (cheap inserts) and the last one of each source is one index lookup away.
- The watermark is the position of the last instance before which everything is done. A re-run
  seeks there; items after it are done only if their line is at most the last done line of their
  source, and only those few are looked up.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import orjson
import xxhash

from engine.store import Store
from sysgen import prompts, tags
from sysgen.config import RunConfig
from sysgen.datasets import Source, UnusedFields, iter_instances, resolve_inputs, source_name
from sysgen.datasets.inputs import named as datasets_named
from sysgen.datasets.instance import Instance, Known, Rejected
from sysgen.run import input_check
from sysgen.run.phases import PhaseSettings

log = logging.getLogger(__name__)
# Drop reasons --retry-failed re-opens: every engine-side one (engine_error covers timeouts and
# retries given up; engine_rejected a request the engine refused), never a verdict on the data.
RETRYABLE = ("engine_error", "engine_rejected", "timeout")
WATERMARK_EVERY_S = 0.5  # a stale watermark only costs a few more done-marker lookups on resume


def fingerprint(cfg: RunConfig, settings: PhaseSettings) -> str:
    """16 hex digits over everything that makes this run's outputs comparable to an earlier one's:
    settings, prompt texts, the tag grammar (a new sysgen version may change it), format, shard."""
    grammar = tags.p1_regex() + tags.p3_regex(tags.TAGS) + str(tags.PHRASE_MAX)
    sets = dict(settings.__dict__)
    if sets.get("p3_context") == "standalone":  # the default layout keeps earlier runs' fingerprints
        del sets["p3_context"]
    payload = {
        "settings": sets,
        "prompts": prompts.digests(),
        "format": cfg.format,
        "shard": cfg.shard,
        "grammar": xxhash.xxh3_64_hexdigest(grammar.encode()),
    }
    # How rows are read changes what an instance is; absent when unset, so older fingerprints hold.
    payload.update({k: getattr(cfg, k) for k in ("columns", "split", "subset") if getattr(cfg, k, None)})
    return xxhash.xxh3_64_hexdigest(orjson.dumps(payload, option=orjson.OPT_SORT_KEYS))


def run_info(cfg: RunConfig, settings: PhaseSettings, identities: dict[str, dict], names: list[str]) -> dict:
    """What `merge` compares across shards: the same settings (fingerprint without the shard),
    inputs (by content hash) and limit, and which shard of how many this run is."""
    shard = cfg.shard_spec
    return {
        "settings": fingerprint(replace(cfg, shard=None), settings),
        "inputs": {n: identities.get(n, {}).get("xxh3") for n in names},
        "limit": cfg.limit,
        "shard": list(shard) if shard else None,
    }


def in_shard(item: Instance | Rejected | Known, shard: tuple[int, int] | None) -> bool:
    """Instances split by conversation content (stable across runs, machines and file order);
    unreadable rows by their position, so each is reported by exactly one shard. A Known row has a
    done marker of this run's fingerprint, which names the shard: it is in it."""
    if shard is None or isinstance(item, Known):
        return True
    i, n = shard
    if isinstance(item, Instance):
        return item.content_hash % n == i
    return xxhash.xxh3_64_intdigest(f"{item.source or source_name(item.path)}:{item.line}".encode()) % n == i


def previous_names(store: Store) -> dict[str, str] | None:
    """The names an earlier run in this store gave its sources (they stay while unique: done markers
    and ids use them); pass to resolve_inputs."""
    named = store.get_meta("source_names")
    return orjson.loads(named) if named else None


class InputStream:
    """The run's rows: the resolved sources read in order, from a watermark, for one shard and
    limit, counting the fields no row used."""

    def __init__(self, cfg: RunConfig, sources: list[Source], unused: UnusedFields) -> None:
        self.cfg, self.sources, self.unused = cfg, sources, unused
        self.names: dict[str, str] = {s.path: s.name for s in sources}  # source path -> source name

    @property
    def files(self) -> tuple[str, ...]:
        """The inputs expanded (folders, globs), in reading order."""
        return tuple(s.path for s in self.sources)

    def stream(
        self,
        watermark: dict | None,
        known: Callable[[str, int], bool] | None,
    ) -> Iterator[tuple[int, Instance | Rejected | Known]]:
        """(seq, item) for the configured inputs, shard and limit, starting at `watermark`; `known`
        says which rows after it are done by position alone."""
        cfg = self.cfg
        start, seq, first = None, 0, None
        if watermark is not None:
            first = watermark["path"]
            start = {watermark["path"]: (watermark["line"], watermark["offset"])}
            seq = watermark["seq"]
        shard = cfg.shard_spec
        items = iter_instances(
            cfg.inputs,
            fmt=cfg.format,
            strict=cfg.strict,
            start=start,
            known=known,
            columns=getattr(cfg, "columns", None),
            split=getattr(cfg, "split", None),
            subset=getattr(cfg, "subset", None),
            sources=self.sources,
            skip_before=first,
            unused=self.unused,
        )
        for item in items:
            if shard is not None and not in_shard(item, shard):
                continue
            if cfg.limit is not None and seq >= cfg.limit:
                return
            yield seq, item
            seq += 1

    def source_report(self) -> dict[str, dict]:
        """stats.json's `sources`: each source's path (and kind where not a file) and the text its
        rows carry that nothing read."""
        out: dict[str, dict] = {}
        for s in self.sources:
            info: dict = {"path": s.path}
            if not s.is_file:
                info["kind"] = s.kind
            if (u := self.unused.summary(s.name)) is not None:
                info["unused_fields"] = u
            out[s.name] = info
        return out


class Checkpoint:
    """What an output directory's store says is done, for one fingerprint: done markers, the
    watermark, and whether this run resumes an earlier one or starts its outputs afresh."""

    def __init__(self, store: Store, fp: str, names: dict[str, str]) -> None:
        self.store, self.fp, self.names = store, fp, names
        self._fp = bytes.fromhex(fp)
        self._src: dict[str, bytes] = {}  # path -> 8-byte source hash
        self.resuming = False
        self.watermark: dict | None = None
        self.last_done: dict[bytes, int] = {}  # source hash -> last line with a done marker
        self.unused: dict | None = None  # the earlier run's unused-field tally, when resuming it
        self.run_info: dict = {}

    @classmethod
    def open(
        cls, store: Store, out: Path, cfg: RunConfig, fp: str, settings: PhaseSettings, sources: list[Source]
    ) -> Checkpoint:
        """Prove and register the sinks; empty them if the configuration or an input changed; load
        the resume points. `sources` are the inputs already resolved (with previous_names)."""
        names = {s.path: s.name for s in sources}
        c = cls(store, fp, names)
        committed = sum(store.add_sink(n, out / f"{n}.jsonl") for n in ("data", "dropped"))
        old = store.get_meta("fingerprint")
        raw = store.get_meta("inputs")
        files = tuple(s.path for s in sources)
        changed, identities = input_check.compare(orjson.loads(raw) if raw else {}, files, names)
        if old is not None and old.decode() != fp:
            log.warning(
                "the configuration changed since the last run in %s: outputs start afresh; stored "
                "requests whose inputs did not change are reused",
                out,
            )
            store.reset_outputs()
        elif old is not None and changed:
            log.warning(
                "%s changed since the last run in %s (not only appended to): outputs start afresh; "
                "unchanged rows are answered from the store",
                ", ".join(changed),
                out,
            )
            store.reset_outputs()
            old = None
        elif old is None and committed:  # outputs this store holds but no run wrote (a merge): afresh
            log.warning(
                "%s holds merged outputs: this run writes them afresh; stored requests are reused", out
            )
            store.reset_outputs()
        store.set_meta("fingerprint", fp)
        store.set_meta("inputs", orjson.dumps(identities))
        store.set_meta("source_names", orjson.dumps({**(previous_names(store) or {}), **names}))
        c.resuming = old is not None and old.decode() == fp
        if c.resuming:
            saved = store.get_meta("unused_fields")
            c.unused = orjson.loads(saved) if saved else None
        c.run_info = run_info(cfg, settings, identities, list(names.values()))
        store.set_meta("run", orjson.dumps({**c.run_info, "finished": False}))
        if c.resuming and cfg.retry_failed:
            c._reopen_engine_failures(out / "dropped.jsonl")
        if c.resuming:
            c._load(files)
        return c

    def _reopen_engine_failures(self, dropped: Path) -> None:
        """--retry-failed: instances dropped for engine-side reasons (errors, rejections, timeouts)
        lose their drop line and done marker in one step, and the watermark goes (they may lie
        before it), so this run reads from the start and processes them again, once each."""
        mine = set(self.names.values())

        def engine_failure(line: bytes) -> tuple[str, int] | None:
            try:
                rec = orjson.loads(line)
                reason = str(rec.get("reason"))
                if not (reason in RETRYABLE or reason.startswith("engine_")) or rec.get("source") not in mine:
                    return None
                _, _, n = rec["id"].rpartition(":")
                return rec["source"], int(n)
            except (orjson.JSONDecodeError, KeyError, ValueError, AttributeError, TypeError):
                return None

        keys = []
        if dropped.exists():
            with open(dropped, "rb") as f:
                for line in f:
                    hit = engine_failure(line)
                    if hit is not None:
                        src = xxhash.xxh3_64_digest(hit[0].encode())
                        keys.append(self._fp + src + hit[1].to_bytes(8, "big"))
        if not keys:
            return
        n = self.store.drop_lines(
            "dropped", lambda line: engine_failure(line) is not None, keys, meta_keys=("watermark",)
        )
        log.info("--retry-failed: %d instance(s) dropped for engine errors are processed again", n)

    def _load(self, files: tuple[str, ...]) -> None:
        raw = self.store.get_meta("watermark")
        wm = orjson.loads(raw) if raw is not None else None
        if wm and wm.get("fingerprint") == self.fp and tuple(wm.get("inputs", ())) == files:
            self.watermark = wm
        for path in files:
            prefix = self._fp + self._source(path)
            last = self.store.last_item(prefix, prefix + b"\xff" * 9)
            if last is not None:
                self.last_done[self._source(path)] = int.from_bytes(last[16:], "big")

    def _source(self, path: str) -> bytes:
        s = self._src.get(path)
        if s is None:
            s = self._src[path] = xxhash.xxh3_64_digest(self.names.get(path, source_name(path)).encode())
        return s

    def item_key(self, item: Instance | Rejected | Known) -> bytes:
        return self._key(item.path, item.line)

    def _key(self, path: str, line: int) -> bytes:
        return self._fp + self._source(path) + line.to_bytes(8, "big")

    def is_done(self, item: Instance | Rejected | Known) -> bool:
        return isinstance(item, Known) or self.known_done(item.path, item.line)

    def known_done(self, path: str, line: int) -> bool:
        """Done by position alone, before the row is converted (the reader's `known`)."""
        last = self.last_done.get(self._source(path))
        return last is not None and line <= last and self.store.has_item(self._key(path, line))

    def save_unused(self, unused: UnusedFields) -> None:
        try:
            self.store.set_meta("unused_fields", orjson.dumps(unused.to_dict()))
        except Exception as e:  # a failing store has its own error on its way; this tally is a report
            log.debug("unused-field counts not saved: %s", e)


class Resume:
    """A run's input stream and its checkpoint, opened together (what the pipeline iterates)."""

    def __init__(self, inputs: InputStream, checkpoint: Checkpoint) -> None:
        self.inputs, self.checkpoint = inputs, checkpoint
        # Read by the pipeline as they are: where the stream starts and what it skips.
        self.files, self.source_report = inputs.files, inputs.source_report
        self.watermark, self.resuming = checkpoint.watermark, checkpoint.resuming
        self.run_info, self.fp = checkpoint.run_info, checkpoint.fp
        self.item_key, self.is_done = checkpoint.item_key, checkpoint.is_done

    @classmethod
    def open(
        cls,
        store: Store,
        out: Path,
        cfg: RunConfig,
        fp: str,
        settings: PhaseSettings,
        sources: Sequence[Source] | None = None,
    ) -> Resume:
        """`sources`: the inputs already resolved (by the run plan), named here as an earlier run named
        them; resolved here if not."""
        previous = previous_names(store)
        sources = (
            resolve_inputs(cfg.inputs, previous) if sources is None else datasets_named(sources, previous)
        )
        checkpoint = Checkpoint.open(store, out, cfg, fp, settings, sources)
        return cls(InputStream(cfg, sources, UnusedFields(checkpoint.unused)), checkpoint)

    def stream(self) -> Iterator[tuple[int, Instance | Rejected | Known]]:
        c = self.checkpoint
        try:
            yield from self.inputs.stream(c.watermark, c.known_done if c.last_done else None)
        finally:
            c.save_unused(self.inputs.unused)


class Position:
    __slots__ = ("done", "seq", "where")

    def __init__(self, seq: int, item: Instance | Rejected | Known, done: bool = False) -> None:
        self.seq = seq
        # Only read rows carry a byte offset to seek to; rows after it are re-read and skipped.
        self.where = (item.path, item.line, item.offset) if isinstance(item, (Instance, Known)) else None
        self.done = done


class Watermark:
    """Positions in stream order; the finished head is popped and the last popped instance's
    position written (through the store's queue, so never ahead of the done markers before it)."""

    def __init__(self, store: Store, fp: str, inputs: tuple[str, ...]) -> None:
        self.store, self.fp, self.inputs = store, fp, list(inputs)
        self.order: deque[Position] = deque()
        self._pending: Position | None = None
        self._written_at = 0.0

    def add(self, seq: int, item: Instance | Rejected | Known, done: bool = False) -> Position:
        pos = Position(seq, item, done)
        self.order.append(pos)
        return pos

    @property
    def spread(self) -> int:
        """Items between the oldest unfinished one and the newest: bounds the memory this holds."""
        return len(self.order)

    def advance(self, now: float, force: bool = False) -> None:
        order = self.order
        while order and order[0].done:
            pos = order.popleft()
            if pos.where is not None:
                self._pending = pos
        last = self._pending
        if last is not None and (force or now - self._written_at >= WATERMARK_EVERY_S):
            self._pending, self._written_at = None, now
            path, line, offset = last.where
            self.store.set_meta(
                "watermark",
                orjson.dumps(
                    {
                        "fingerprint": self.fp,
                        "inputs": self.inputs,
                        "seq": last.seq,
                        "path": path,
                        "line": line,
                        "offset": offset,
                    }
                ),
            )
