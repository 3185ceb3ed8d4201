"""ChatPrompter as of commit 715e7f5 (before multi-turn), kept verbatim as the reference that today's
prompts must still equal: `--turns first` reproduces earlier runs, request keys included."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

_SENTINEL = "\ue000SYSGEN-USER\ue000"
VERIFY_FIRST = 4  # prompts per template checked against whole-string tokenization


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
            split = self._splits[system] = self._make_split(system)
        if not split.ok:
            return tuple(self.encode(self.render(system, user)))
        ids = split.prefix_ids + tuple(self.encode(split.mid + user + split.tail))
        if split.checked < VERIFY_FIRST:
            split.checked += 1
            whole = tuple(self.encode(self.render(system, user)))
            if whole != ids:
                log.warning(
                    "prefix split disagrees with whole-prompt tokenization; disabled for this template"
                )
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
