"""Early guards that stop a run on its first few requests when the engine is set up wrong, instead
of dropping (or silently keeping) the whole input one request at a time.

ConstraintCanary: a server (or a router in front of it) that drops the regex field answers every
constrained request with free text. The first `sample` constrained answers that ended with `stop`
are checked against their regex; when most of them do not match, the run stops.

FirstFailures: a run whose first final failures, before any request succeeded, are all of one kind
(every request refused the same way: a router that refuses token-id prompts, a wrong model name)
stops after a handful, whatever the input size.
"""

from __future__ import annotations

import logging
import re
from functools import lru_cache

from engine.backend import EngineDied, FailureStreak

log = logging.getLogger(__name__)

CANARY_SAMPLE = 8  # constrained answers that ended with `stop` checked at the start of a run
CANARY_MIN_MISMATCHES = 2  # one odd answer is not proof
FIRST_FAILURES = 5  # same-kind failures before any success that stop the run


class ConstraintIgnored(EngineDied):
    """Constrained answers do not match their regex: the server is not enforcing the constraint."""


class FirstRequestsFailed(FailureStreak):
    """Every request so far failed, all the same way: a configuration error, not bad rows."""


@lru_cache(maxsize=64)
def _compiled(regex: str) -> re.Pattern | None:
    try:
        return re.compile(regex, re.DOTALL)
    except re.error:  # a dialect Python does not read: the canary cannot judge it
        log.debug("constraint canary: Python cannot compile the regex; not checked")
        return None


class ConstraintCanary:
    """`check(regex, text)` for each constrained answer that ended with `stop`; raises
    ConstraintIgnored once mismatches outnumber matches (at least CANARY_MIN_MISMATCHES) among
    the first `sample`. `where` names the engine in the message."""

    def __init__(self, where: str, sample: int = CANARY_SAMPLE) -> None:
        self.where = where
        self.sample = sample
        self.matched = 0
        self.mismatched = 0
        self.example = ""

    @property
    def done(self) -> bool:
        return self.matched + self.mismatched >= self.sample

    def check(self, regex: str, text: str) -> None:
        if self.done:
            return
        pattern = _compiled(regex)
        if pattern is None:
            return
        if pattern.fullmatch(text):
            self.matched += 1
            return
        self.mismatched += 1
        self.example = self.example or text
        if self.mismatched >= CANARY_MIN_MISMATCHES and self.mismatched > self.matched:
            seen = self.matched + self.mismatched
            raise ConstraintIgnored(
                f"{self.mismatched} of the first {seen} constrained answers from {self.where} do not match "
                f"their regex (e.g. {self.example[:120]!r}): the server is ignoring the regex field. Send "
                "requests to the server directly, or through a router that forwards it (`smg launch "
                "--backend vllm ...`; sglang-router drops it on chat requests), and check that "
                "--openai-server names the server behind --url (vllm or sglang)"
            )


class FirstFailures:
    """Final failures of one kind before the first success; `failure()` is True when FIRST_FAILURES
    of them came in a row, `success()` ends the watch for good."""

    def __init__(self, limit: int = FIRST_FAILURES) -> None:
        self.limit = limit  # 0 = never
        self.active = limit > 0
        self.kind: str | None = None
        self.count = 0

    def success(self) -> None:
        self.active = False

    def failure(self, kind: str) -> bool:
        if not self.active:
            return False
        self.count = self.count + 1 if kind == self.kind else 1
        self.kind = kind
        return self.count >= self.limit
