"""The hf backend's single model thread: admit waiting rows into the running batch, decode one step
for all rows, retire finished rows; repeat. Continuous batching: a row joins as soon as a slot is
free, without waiting for the batch to drain.

Torch releases the GIL inside its kernels, so the asyncio loop stays responsive while this runs.
"""

from __future__ import annotations

import inspect
import logging
import queue
import threading
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

from engine.backend import EngineDied, EngineError, TransientEngineError
from engine.backends.hf_kv import (
    LayerKV,
    PrefixCache,
    cache_from,
    cache_layers,
    common_prefix_len,
    select_rows,
    stack_rows,
)
from engine.backends.hf_rows import Row, TokenChooser

log = logging.getLogger(__name__)

# A shared prefix shorter than this is recomputed rather than cached: the cache entry, the copy and
# the bookkeeping cost more than prefilling a few dozen tokens.
MIN_PREFIX = 32


class Worker:
    def __init__(self, model: Any, tokenizer: Any, *, eos_ids: frozenset[int], max_batch: int, threads: int,
                 logits_width: int, prefix_cache: bool = True) -> None:
        self.model, self.tokenizer, self.eos_ids = model, tokenizer, eos_ids
        self.max_batch, self.threads = max_batch, threads
        self.chooser = TokenChooser(max_batch, logits_width)
        self.prefixes = PrefixCache() if prefix_cache else None
        self.inbox: queue.SimpleQueue[Row | None] = queue.SimpleQueue()
        self.rows: list[Row] = []
        self.cache = None  # the running batch's KV (DynamicCache of GrowingLayer)
        self.stopping = False
        self.reason = "backend closed"  # what callers are told once the loop has ended
        self._lock = threading.Lock()
        self.steps = 0
        # transformers 5 renamed past_key_values to cache (the old name still works, with a warning).
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.thread = threading.Thread(target=self._run, name="hf-backend", daemon=True)
        self.thread.start()

    def submit(self, row: Row) -> None:
        # Under the lock the final drain takes, so a row is either drained (and failed) or refused:
        # never left in the inbox of a thread that has exited.
        with self._lock:
            if self.stopping:
                raise EngineDied(self.reason, row.request)
            self.inbox.put(row)

    def stop(self) -> None:
        self.stopping = True
        self.inbox.put(None)

    # -- loop ------------------------------------------------------------------------------------

    def _run(self) -> None:
        torch.set_num_threads(self.threads)
        try:
            with torch.inference_mode():
                while not self.stopping:
                    new = self._take()
                    if new:
                        self._guarded(new, self._admit)
                    if self.rows:
                        self._guarded(self.rows, self._step, drop_batch=True)
        except BaseException as exc:  # a bug here must not leave callers waiting forever
            log.exception("hf worker died")
            self.reason = f"hf worker died: {exc!r}"
        finally:
            with self._lock:
                self.stopping = True
            for row in self.rows:
                row.resolve(error=EngineDied(self.reason, row.request))
            self.rows, self.cache = [], None
            while True:
                try:
                    row = self.inbox.get_nowait()
                except queue.Empty:
                    break
                if row is not None:
                    row.resolve(error=EngineDied(self.reason, row.request))

    def _guarded(self, rows: list[Row], fn: Callable[[list[Row]], None], drop_batch: bool = False) -> None:
        """Run fn(rows); an exception fails exactly those rows (retryable) and the loop goes on."""
        try:
            fn(rows)
        except Exception as exc:
            log.warning("hf backend: %d request(s) failed: %r", len(rows), exc, exc_info=True)
            for row in rows:
                row.resolve(error=TransientEngineError(f"hf backend: {exc!r}", row.request))
            if drop_batch:  # its KV may be half-updated
                self.rows, self.cache = [], None

    def _take(self) -> list[Row]:
        """Waiting rows for the free slots; blocks only when nothing is running."""
        new: list[Row] = []
        while len(self.rows) + len(new) < self.max_batch:
            try:
                row = self.inbox.get(block=not self.rows and not new)
            except queue.Empty:
                break
            if row is None or self.stopping:
                self.stopping = True
                if row is not None:
                    self.inbox.put(row)  # failed with the rest in _run's finally
                break
            if not row.abandoned:
                new.append(row)
        return new

    # -- admission: prefill new rows (sharing a prefix's KV where one is cached) ----------------

    def _admit(self, new: list[Row]) -> None:
        if self.prefixes is not None:
            self._cache_group_prefixes(new)
        parts, logits, ok = [], [], []
        for row in new:
            try:
                layers, last = self._prefill(row)
            except Exception as exc:  # this prompt's failure is not its neighbours'
                log.warning("hf backend: prefill failed: %r", exc, exc_info=True)
                row.resolve(error=TransientEngineError(f"hf backend: prefill failed: {exc!r}", row.request))
                continue
            row.n_real = len(row.ids)
            parts.append(layers)
            logits.append(last)
            ok.append(row)
        if not ok:
            return
        new = ok
        tokens = self.chooser.choose(new, torch.stack(logits).float())
        joining = [i for i, tok in enumerate(tokens) if not self._accept(new[i], tok)]
        if not joining:
            return
        running = [cache_layers(self.cache)] if self.rows else []
        self.cache = stack_rows(running + [parts[i] for i in joining])
        self.rows = self.rows + [new[i] for i in joining]

    def _cache_group_prefixes(self, new: list[Row]) -> None:
        groups: dict[str, list[Row]] = defaultdict(list)
        for row in new:
            groups[row.request.group].append(row)
        for rows in groups.values():
            if len(rows) < 2:
                continue
            seqs = [r.ids for r in rows]
            n = min(common_prefix_len(seqs), min(len(s) for s in seqs) - 1)
            if n >= MIN_PREFIX:
                try:
                    self._ensure_prefix(seqs[0][:n])
                except Exception as exc:  # only an optimisation: the rows prefill in full instead
                    log.warning("hf backend: shared-prefix prefill failed: %r", exc, exc_info=True)

    def _ensure_prefix(self, prefix: tuple[int, ...]) -> None:
        hit = self.prefixes.lookup(prefix, proper=False)
        if hit is not None and len(hit[0]) >= len(prefix) - MIN_PREFIX:
            return  # close enough: the few extra tokens are prefilled per row
        start = len(hit[0]) if hit else 0
        cache = cache_from(hit[1]) if hit else None
        layers, _ = self._forward(prefix[start:], start, cache)
        self.prefixes.insert(prefix, layers)

    def _prefill(self, row: Row) -> tuple[list[LayerKV], torch.Tensor]:
        hit = self.prefixes.lookup(row.ids) if self.prefixes is not None else None
        start = len(hit[0]) if hit else 0
        row.cached = start
        return self._forward(row.ids[start:], start, cache_from(hit[1]) if hit else None)

    def _forward(self, ids: tuple[int, ...], start: int, cache: Any) -> tuple[list[LayerKV], torch.Tensor]:
        from transformers import DynamicCache

        cache = cache if cache is not None else DynamicCache()
        input_ids = torch.tensor([ids], dtype=torch.long)
        positions = torch.arange(start, start + len(ids), dtype=torch.long).unsqueeze(0)
        out = self.model(input_ids=input_ids, position_ids=positions, use_cache=True, logits_to_keep=1,
                         **{self._cache_kw: cache})
        return cache_layers(cache), out.logits[0, -1]

    # -- decode ----------------------------------------------------------------------------------

    def _step(self, rows: list[Row]) -> None:
        n = self.cache.layers[0].n
        lens = torch.tensor([r.n_real for r in rows], dtype=torch.long)
        # Each row's real tokens are right-aligned; after this step it has n_real + 1 of n + 1.
        mask = (torch.arange(n + 1).unsqueeze(0) >= (n - lens).unsqueeze(1)).long()
        input_ids = torch.tensor([[r.out[-1]] for r in rows], dtype=torch.long)
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=lens.unsqueeze(1),
                         use_cache=True, **{self._cache_kw: self.cache})
        self.steps += 1
        for r in rows:
            r.n_real += 1
        tokens = self.chooser.choose(rows, out.logits[:, -1].float())
        keep = [i for i, tok in enumerate(tokens) if not self._accept(rows[i], tok)]
        if len(keep) == len(rows):
            return
        self.rows = [rows[i] for i in keep]
        if not keep:
            self.cache = None
            return
        self.cache = select_rows(self.cache, keep, max(r.n_real for r in self.rows))

    def _accept(self, row: Row, token: int) -> bool:
        """True when the row is finished (and resolved) or abandoned by its caller."""
        if row.abandoned:
            return True
        try:
            finish = row.accept(token, self.eos_ids, self.tokenizer)
            if finish is None:
                return False
            row.resolve(row.result(finish, self.eos_ids, self.tokenizer))
        except EngineError as exc:
            row.resolve(error=exc)
        return True
