"""Chat prompts as token ids: the chat template's own markers are special tokens, data never is.

A chat template renders a conversation as literal text (role headers, end-of-turn markers) around
each message's content. We render it once per shape (the sequence of roles) with a placeholder for
each content and cut the result at the template's special tokens into a *layout*: special-token ids,
and text runs made of literal text and content slots. A prompt is the layout filled in: each text run
is tokenized with special tokens split, so `<|im_end|>` written in a row stays plain text (it can
neither end its turn nor forge an assistant turn, on any backend that receives our ids), and special
ids come only from the template. Tokenizers cut a string at special tokens before BPE runs, so for
data without special-token text this equals tokenizing the whole rendered string: the first prompts
of every layout are checked against it, and a layout that disagrees falls back to the whole string.

Shared system text (the P1/P3 templates) is tokenized once: the ids before the first run holding
other content are cached per (shape, system text) in a small bounded table. P4's system message is
new for every instance and is not cached, so memory stays flat however many instances pass.

Conversations grow as chains: the prompt of turn j+1 is the prompt of turn j, then the answer's ids,
then the template text from the end of that answer to the next generation prompt. It extends turn
j's prompt plus its answer exactly, so an engine's prefix cache serves the whole history. That text
is rendered from a window of the roles (the first few and the last few), so a turn costs the same at
turn 4,000 as at turn 10 (docs/limits.md).
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from operator import itemgetter
from typing import Any

log = logging.getLogger(__name__)

VERIFY_FIRST = 4  # prompts per layout checked against whole-string tokenization
MAX_LAYOUTS = 256  # shapes (role sequences) kept; past this, layouts are built per prompt
MAX_SHARED = 32  # cached system prefixes (the few shared templates; never one per instance)
_MARK = "\ue000{}\ue001"  # content slot i in rendered text (private-use characters)
_PAD = " \n"  # around a placeholder: a template that strips or rewrites content shows it
_MARK_RE = re.compile("\ue000(\\d+)\ue001")
_PADDED_RE = re.compile(re.escape(_PAD) + "(\ue000\\d+\ue001)" + re.escape(_PAD))
WINDOW_HEAD, WINDOW_TAIL = 4, 8  # roles a long conversation's next-turn suffix is rendered from

Message = tuple[str, str]  # (role, content)
Item = int | tuple  # a special-token id, or a text run: literal strings and slot indexes


class PromptError(ValueError):
    """The prompt cannot be built safely (data holds special-token text this tokenizer cannot split)."""


class PromptTooLong(PromptError):
    """The prompt surely holds more tokens than the engine's context; found without tokenizing it."""


@dataclass
class _Layout:
    items: list[Item]
    literal: dict[int, tuple[int, ...]]  # item index -> ids, for runs without slots
    system_end: int  # items before this index hold no slot but the system's (slot 0)
    checked: int = 0
    ok: bool = True


class ChatPrompter:
    """Builds token-id prompts for chats (optionally growing turn by turn) with a HF tokenizer. One
    thread per prompter, and per tokenizer: a call flips the tokenizer's split-special-tokens switch."""

    def __init__(self, tokenizer: Any, max_tokens: int = 0) -> None:
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens  # the engine's context; 0 = unknown, nothing refused
        # Bytes of the longest vocabulary entry (as its UTF-8 string, never fewer bytes than it stands
        # for): no token covers more text, so text of B bytes is at least B / this many tokens.
        self._token_bytes = (
            max((len(t.encode()) for t in tokenizer.get_vocab()), default=1) if max_tokens else 1
        )
        specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
        for tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
            if getattr(tok, "special", False):
                specials.add(str(tok))
        self._specials = sorted((s for s in specials if s), key=len, reverse=True)
        self._special_id = {s: int(tokenizer.convert_tokens_to_ids(s)) for s in self._specials}
        alts = [re.escape(s) for s in self._specials] + ["\ue000\\d+\ue001"]
        self._cut = re.compile("(" + "|".join(alts) + ")")
        self._layouts: OrderedDict[tuple[str, ...], _Layout | None] = OrderedDict()
        self._suffixes: OrderedDict[tuple[str, ...], _Layout | None] = OrderedDict()
        self._shared: OrderedDict[tuple, tuple[int, ...]] = OrderedDict()
        self.can_split = self._probe_split()

    # -- tokenization ------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Template text: special-token text becomes special tokens."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_data(self, texts: Sequence[str]) -> list[list[int]]:
        """Data (one batched call): special-token text stays plain text."""
        if not texts:
            return []
        if not self.can_split:
            bad = next((s for t in texts for s in self._specials if s in t), None)
            if bad is not None:
                raise PromptError(
                    f"the text holds the special token {bad!r} and this tokenizer cannot "
                    "encode it as plain text"
                )
            return [list(x) for x in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
        out = self.tokenizer(list(texts), add_special_tokens=False, split_special_tokens=True)
        return [list(x) for x in out["input_ids"]]

    def _probe_split(self) -> bool:
        if not self._specials:
            return True
        s = self._specials[-1]
        try:
            ids = self.tokenizer([s], add_special_tokens=False, split_special_tokens=True)["input_ids"][0]
        except TypeError:
            return False
        return list(ids) != [self._special_id[s]]

    def least_tokens(self, text: str) -> int:
        """A lower bound on the tokens of `text`, from its length alone (no tokenizing)."""
        return -(-len(text.encode()) // self._token_bytes)

    def check_fits(self, known: int, texts: Sequence[str]) -> None:
        """PromptTooLong when `known` ids plus `texts` surely exceed max_tokens: a row too long for
        the context is refused before it is tokenized (a 7 MB row took 3.3 GB and 20 s to find out)."""
        if not self.max_tokens:
            return
        need = known + sum(self.least_tokens(t) for t in texts)
        if need > self.max_tokens:
            raise PromptTooLong(
                f"the prompt holds at least {need:,} tokens; the engine's context is {self.max_tokens:,}"
            )

    def has_special_text(self, text: str) -> bool:
        return any(s in text for s in self._specials)

    # -- rendering ---------------------------------------------------------------------------------

    def render_messages(self, messages: Sequence[Message], generation_prompt: bool = True) -> str:
        msgs = [{"role": r, "content": c} for r, c in messages]
        return self.tokenizer.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=generation_prompt
        )

    def render(self, system: str | None, user: str) -> str:
        return self.render_messages(_pair(system, user))

    def _marked(self, roles: tuple[str, ...]) -> str | None:
        """The rendered shape with content slot i as _MARK(i); None if the template rewrites content.
        One pass over the text: each slot shown at most once, in order, with its padding intact."""
        padded = [_PAD + _MARK.format(i) + _PAD for i in range(len(roles))]
        try:
            text = self.render_messages(list(zip(roles, padded, strict=True)))
        except Exception:  # a template that refuses this shape: whole-string rendering will say why
            return None
        last, end, pad = -1, 0, len(_PAD)
        for m in _MARK_RE.finditer(text):  # a slot the template leaves out (earlier answers) is absent
            i, at = int(m.group(1)), m.start() - pad
            if i <= last or at < end or text[at : m.start()] != _PAD or text[m.end() : m.end() + pad] != _PAD:
                return None
            last, end = i, m.end() + pad
        return _PADDED_RE.sub(r"\1", text)

    def _layout_of(self, text: str) -> _Layout:
        items: list[Item] = []
        run: list = []
        for part in self._cut.split(text):
            if not part:
                continue
            if part in self._special_id:
                if run:
                    items.append(tuple(run))
                    run = []
                items.append(self._special_id[part])
            elif (m := _MARK_RE.fullmatch(part)) is not None:
                run.append(int(m.group(1)))
            else:
                run.append(part)
        if run:
            items.append(tuple(run))
        literal = {
            k: tuple(self.encode("".join(it)))
            for k, it in enumerate(items)
            if isinstance(it, tuple) and all(isinstance(p, str) for p in it)
        }
        end = next(
            (
                k
                for k, it in enumerate(items)
                if isinstance(it, tuple) and any(isinstance(p, int) and p != 0 for p in it)
            ),
            len(items),
        )
        return _Layout(items, literal, end)

    def _layout(self, roles: tuple[str, ...]) -> _Layout | None:
        if roles in self._layouts:
            self._layouts.move_to_end(roles)
            return self._layouts[roles]
        text = self._marked(roles)
        lay = self._layout_of(text) if text is not None else None
        _put(self._layouts, roles, lay, MAX_LAYOUTS)
        return lay

    def _fill(
        self, lay: _Layout, contents: Sequence[str], start: int = 0, stop: int | None = None
    ) -> list[int]:
        parts: list[Sequence[int] | None] = []
        texts, where = [], []
        for k in range(start, len(lay.items) if stop is None else stop):
            it = lay.items[k]
            if isinstance(it, int):
                parts.append((it,))
            elif k in lay.literal:
                parts.append(lay.literal[k])
            else:
                where.append(len(parts))
                parts.append(None)
                texts.append("".join(p if isinstance(p, str) else contents[p] for p in it))
        for w, ids in zip(where, self.encode_data(texts), strict=True):
            parts[w] = ids
        return list(chain.from_iterable(parts))  # type: ignore[arg-type]

    # -- prompts -----------------------------------------------------------------------------------

    def prompt(self, messages: Sequence[Message], *, shared_system: bool = False) -> tuple[int, ...]:
        """Ids of a conversation (ending with a user turn) plus the generation prompt.
        `shared_system`: the system text is a template many prompts share; cache its ids."""
        roles = tuple(r for r, _ in messages)
        contents = [c for _, c in messages]
        self.check_fits(0, contents)
        lay = self._layout(roles)
        if lay is None or not lay.ok:
            return self._whole(messages)
        if shared_system and roles and roles[0] == "system" and lay.system_end > 0:
            key = (roles, contents[0])
            pre = self._shared.get(key)
            if pre is None:
                pre = tuple(self._fill(lay, contents, 0, lay.system_end))
                _put(self._shared, key, pre, MAX_SHARED)
            ids = pre + tuple(self._fill(lay, contents, lay.system_end))
        else:
            ids = tuple(self._fill(lay, contents))
        if lay.checked < VERIFY_FIRST and not any(self.has_special_text(c) for c in contents):
            lay.checked += 1
            whole = tuple(self.encode(self.render_messages(messages)))
            if whole != ids:
                log.warning(
                    "chat layout disagrees with whole-prompt tokenization for roles %s; using "
                    "whole prompts for this shape",
                    roles,
                )
                lay.ok = False
                return whole
        return ids

    def ids(self, system: str | None, user: str) -> tuple[int, ...]:
        """A (system, user) prompt whose system text is a shared template."""
        return self.prompt(_pair(system, user), shared_system=True)

    def extend(self, prev: tuple[int, ...], messages: Sequence[Message]) -> tuple[int, ...]:
        """The next turn's prompt: `messages` ends (…, assistant answer, user); `prev` is the prompt
        the answer was generated from. Returns prev + answer ids + the template text up to the new
        generation prompt, so it extends prev + answer exactly; when this template's rendering is not
        a chain (it rewrites earlier turns), the whole conversation instead.

        Linear in the conversation: the template text after the answer is taken from a window of the
        roles (the first few and the last few, `_window`), rendered once per window, never from the
        whole conversation; each window is checked against the whole rendering of its first prompts."""
        if len(messages) < 3:
            return self.prompt(messages)
        window = _window(tuple(map(itemgetter(0), messages)))
        suf = self._suffix(window)
        if suf is None or not suf.ok:
            return self.prompt(messages)
        contents = [""] * len(window)
        contents[-1] = messages[-1][1]
        self.check_fits(len(prev), (messages[-2][1], messages[-1][1]))
        answer = self.encode_data([messages[-2][1]])[0]
        ids = prev + tuple(answer) + tuple(self._fill(suf, contents))
        if suf.checked < VERIFY_FIRST and not any(self.has_special_text(c) for _, c in messages):
            suf.checked += 1
            shown = self.tokenizer.decode(
                list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False
            )
            if shown != self.render_messages(messages):
                log.warning("chat template is not a chain for roles %s; whole prompts for this shape", window)
                suf.ok = False
                return self.prompt(messages)
        return ids

    def _suffix(self, roles: tuple[str, ...]) -> _Layout | None:
        if roles in self._suffixes:
            return self._suffixes[roles]
        lay = None
        full, prev = self._marked(roles), self._marked(roles[:-2])
        answer = _MARK.format(len(roles) - 2)
        if full is not None and prev is not None and full.startswith(prev + answer):
            lay = self._layout_of(full[len(prev) + len(answer) :])
            if any(
                isinstance(p, int) and p != len(roles) - 1
                for it in lay.items
                if isinstance(it, tuple)
                for p in it
            ):
                lay = None  # the text after the answer shows earlier content: not a chain we can window
        _put(self._suffixes, roles, lay, MAX_LAYOUTS)
        return lay

    def _whole(self, messages: Sequence[Message]) -> tuple[int, ...]:
        if any(self.has_special_text(c) for _, c in messages):
            raise PromptError(
                "a message holds special-token text and this chat template cannot be split "
                "into template and data safely"
            )
        return tuple(self.encode(self.render_messages(messages)))

    def prefix_len(self, system: str | None) -> int:
        """Cached ids of a shared system template (0 when none is cached)."""
        roles = ("user",) if system is None else ("system", "user")
        pre = self._shared.get((roles, system))
        return len(pre) if pre is not None else 0


def _window(roles: tuple[str, ...]) -> tuple[str, ...]:
    """The roles a long conversation's next-turn template text is rendered from: the first
    WINDOW_HEAD (or one more, to keep the parity templates check) and the last WINDOW_TAIL, when what
    lies between repeats one (user, assistant) pair; else all of them."""
    n = len(roles)
    head = WINDOW_HEAD + (n - WINDOW_HEAD - WINDOW_TAIL) % 2
    middle = n - head - WINDOW_TAIL
    if middle < 2 or roles[head : n - WINDOW_TAIL] != roles[head : head + 2] * (middle // 2):
        return roles
    return roles[:head] + roles[n - WINDOW_TAIL :]


def _pair(system: str | None, user: str) -> list[Message]:
    return ([("system", system)] if system is not None else []) + [("user", user)]


def _put(table: OrderedDict, key, value, limit: int) -> None:
    table[key] = value
    table.move_to_end(key)
    while len(table) > limit:
        table.popitem(last=False)
