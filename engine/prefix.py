"""Chat prompts as token ids with the shared template tokenized once.

A prompt is rendered by the model's chat template as  head + user_text + tail, where head holds the
shared system text (the template). We split head right after its last special token: special tokens
are matched before BPE runs, so tokenize(A + S + B) == tokenize(A) + [S] + tokenize(B) whenever S is
a special token. The part up to the split is tokenized once per template; each instance only pays
for its own text. The first prompts of every template are checked against whole-string tokenization;
on any mismatch the split is disabled for that template (correctness over speed).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

_SENTINEL = "\ue000SYSGEN-USER\ue000"
VERIFY_FIRST = 4  # prompts per template checked against whole-string tokenization
MAX_SPLITS = 256  # templates whose split is kept (and one-off system texts remembered)


@dataclass
class _Split:
    prefix_ids: tuple[int, ...]
    mid: str  # text between the split point and the user text (e.g. "user\n")
    tail: str  # text after the user text (end of turn + generation prompt)
    checked: int = 0
    ok: bool = True


class ChatPrompter:
    """Builds token-id prompts for (system, user) chats, caching the tokenized system part."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._splits: dict[str | None, _Split] = {}
        self._seen_once: dict[str | None, None] = {}  # insertion-ordered: the oldest goes first
        specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
        for tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
            if getattr(tok, "special", False):
                specials.add(str(tok))
        self._specials = sorted(specials, key=len, reverse=True)

    def render(self, system: str | None, user: str) -> str:
        msgs = ([{"role": "system", "content": system}] if system is not None else []) + [
            {"role": "user", "content": user}
        ]
        return self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def ids(self, system: str | None, user: str) -> tuple[int, ...]:
        split = self._splits.get(system)
        if split is None:
            # A system text seen once (P4's per-instance system message) is tokenized whole: a split
            # would cost two more tokenizations and stay in memory for good. Templates seen twice
            # are split; at most MAX_SPLITS are kept (oldest dropped).
            if system not in self._seen_once:
                self._seen_once[system] = None
                if len(self._seen_once) > MAX_SPLITS:
                    del self._seen_once[next(iter(self._seen_once))]
                return tuple(self.encode(self.render(system, user)))
            if len(self._splits) >= MAX_SPLITS:
                del self._splits[next(iter(self._splits))]
            split = self._splits[system] = self._make_split(system)
        if not split.ok:
            return tuple(self.encode(self.render(system, user)))
        ids = split.prefix_ids + tuple(self.encode(split.mid + user + split.tail))
        if split.checked < VERIFY_FIRST:
            split.checked += 1
            whole = tuple(self.encode(self.render(system, user)))
            if whole != ids:
                log.warning("prefix split disagrees with whole-prompt tokenization; "
                            "disabled for this template")
                split.ok = False
                return whole
        return ids

    def _make_split(self, system: str | None) -> _Split:
        rendered = self.render(system, _SENTINEL)
        if rendered.count(_SENTINEL) != 1:
            return _Split((), "", "", ok=False)
        head, tail = rendered.split(_SENTINEL)
        cut = max((head.rfind(s) + len(s) for s in self._specials if s in head), default=-1)
        if cut <= 0:
            return _Split((), "", "", ok=False)
        return _Split(tuple(self.encode(head[:cut])), head[cut:], tail)

    def prefix_len(self, system: str | None) -> int:
        split = self._splits.get(system)
        return len(split.prefix_ids) if split and split.ok else 0
