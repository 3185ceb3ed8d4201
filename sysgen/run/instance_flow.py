"""One instance's walk through P1 → P2 → P3 → P4, ending in a kept record or a drop with a reason."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.prefix import PromptError, PromptTooLong
from engine.request import Result
from sysgen import tags
from sysgen.datasets.instance import Instance, Rejected
from sysgen.run.p4_turns import answer_turns, drop_reason
from sysgen.run.phases import (
    P1Turn,
    PhaseSettings,
    PromptBuilder,
    p1_request,
    p1_user_text,
    p2_filter,
    p3_request,
    p4_request,
    user_turns,
)


@dataclass
class Outcome:
    """`record` for a kept instance; else `phase` and `reason` of the drop."""

    id: str
    source: str
    record: dict[str, Any] | None = None
    phase: str = ""
    reason: str = ""
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def kept(self) -> bool:
        return self.record is not None

    def to_line(self) -> tuple[str, dict[str, Any]]:
        if self.record is not None:
            return "data", self.record
        return "dropped", {
            "id": self.id,
            "source": self.source,
            "phase": self.phase,
            "reason": self.reason,
            "detail": self.detail[:500],
            **self.extra,
        }


def rejected_outcome(rej: Rejected) -> Outcome:
    # Named by its source like every instance, so one file is one source in the stats, however typed.
    source = rej.source or rej.path
    reason = "unreadable_file" if rej.scope == "file" else "unreadable_row"
    return Outcome(id=f"{source}:{rej.line}", source=source, phase="input", reason=reason, detail=rej.reason)


def _failed(inst: Instance, phase: str, res: Result, keys: dict, extra: dict | None = None) -> Outcome | None:
    if not res.ok:
        reason = drop_reason(res)
        return Outcome(
            inst.id,
            inst.source,
            phase=phase,
            reason=reason,
            detail=res.error or "",
            extra={"request_keys": keys, **(extra or {})},
        )
    if res.finish_reason == "length":
        return Outcome(
            inst.id,
            inst.source,
            phase=phase,
            reason="truncated",
            detail=res.text[-200:],
            extra={"request_keys": keys, **(extra or {})},
        )
    return None


async def run_instance(inst: Instance, submit, build: PromptBuilder, s: PhaseSettings) -> Outcome:
    """`submit` is Scheduler.submit (or anything with its signature)."""
    try:
        out = await _run_instance(inst, submit, build, s)
    except PromptTooLong as e:  # found from its length, before tokenizing it all
        out = Outcome(inst.id, inst.source, phase="p1", reason="context", detail=str(e))
    except PromptError as e:  # a tokenizer that cannot keep special-token text in this row as text
        out = Outcome(inst.id, inst.source, phase="input", reason="unsafe_prompt", detail=str(e))
    if s.turns == "all" and not out.kept:  # for retention per turn (stats "turns")
        out.extra.setdefault("user_turns", len(user_turns(inst)))
    return out


async def _run_instance(inst: Instance, submit, build: PromptBuilder, s: PhaseSettings) -> Outcome:
    keys: dict[str, str] = {}
    size = sum(len(t.content) for t in inst.turns)
    req1 = await build.off_loop(size, lambda b: p1_request(inst, b, s))
    keys["p1"] = req1.key.hex()
    r1 = await submit(req1)
    if (out := _failed(inst, "p1", r1, keys)) is not None:
        return out

    filtered = p2_filter(r1.text, s)
    p2: dict[str, Any] = {"p1_well_formed": filtered.well_formed, "p2_dropped": dict(filtered.dropped)}
    if filtered.copied:  # the phrase and the example it copies, per tag (kept ones too, with --keep-copies)
        p2["p2_copied"] = {t: {"phrase": p, "example": ex} for t, (p, ex) in filtered.copied.items()}
    if not filtered.tags:
        reason = "copied_example" if filtered.copied else "no_valid_tags"
        return Outcome(
            inst.id,
            inst.source,
            phase="p2",
            reason=reason,
            detail=r1.text[:300],
            extra={"request_keys": keys, **p2},
        )

    p1 = P1Turn(req1.prompt, p1_user_text(inst, s), r1.text) if s.p3_context != "standalone" else None
    req3 = await build.off_loop(len(p1.prompt) if p1 else 0, lambda b: p3_request(filtered, b, s, p1))
    keys["p3"] = req3.key.hex()
    r3 = await submit(req3)
    if (out := _failed(inst, "p3", r3, keys, p2)) is not None:
        return out
    verdicts = tags.parse_verdicts(r3.text, list(filtered.tags))
    kept = tags.kept_tags(filtered.tags, verdicts)
    if not kept:
        return Outcome(
            inst.id,
            inst.source,
            phase="p3",
            reason="no_good_tags",
            detail=r3.text[:200],
            extra={"request_keys": keys, "tags": filtered.tags, "verdicts": verdicts, **p2},
        )

    system = tags.strip_tags(kept)
    record = {
        "id": inst.id,
        "source": inst.source,
        "fmt": inst.fmt,
        "messages": None,
        "original_answers": None,
        "original_system": inst.system,
        "tags": filtered.tags,
        "verdicts": verdicts,
        "kept_tags": list(kept),
        **p2,
        "turns": len(inst.turns),
        "model": s.model_id,
        "request_keys": keys,
    }
    if s.turns == "first":
        return await _first_turn(inst, system, record, submit, build, s, keys, p2)
    done = await answer_turns(inst, system, submit, build, s)
    keys["p4"] = done.keys
    turn_info = {
        "user_turns": done.user_turns,
        "answered_turns": done.answered,
        "p4_resampled_turns": done.resampled,
    }
    if done.reason and not (s.keep_partial and done.partial_ok):
        detail = done.detail
        return Outcome(
            inst.id,
            inst.source,
            phase="p4",
            reason=done.reason,
            detail=detail,
            extra={"request_keys": keys, **p2, **turn_info},
        )
    record.update(messages=done.messages, original_answers=done.original_answers, **turn_info)
    if done.reason:
        record["partial"] = {
            "reason": f"p4:{done.reason}",
            "kept_turns": done.answered,
            "note": "--keep-partial: the turns after the failed one are left out",
        }
    return Outcome(inst.id, inst.source, record=record)


async def _first_turn(
    inst: Instance,
    system: str,
    record: dict,
    submit,
    build: PromptBuilder,
    s: PhaseSettings,
    keys: dict,
    p2: dict,
) -> Outcome:
    """`--turns first`: the paper's single-turn P4, the same request and outcome as before multi-turn."""
    req4 = await build.off_loop(len(inst.first_user), lambda b: p4_request(inst, system, b, s))
    keys["p4"] = req4.key.hex()
    r4 = await submit(req4)
    if (out := _failed(inst, "p4", r4, keys, p2)) is not None:
        return out
    answer = r4.text.strip()
    if not answer:
        return Outcome(
            inst.id, inst.source, phase="p4", reason="empty_answer", extra={"request_keys": keys, **p2}
        )
    record["messages"] = [
        {"role": "system", "content": system},
        {"role": "user", "content": inst.first_user},
        {"role": "assistant", "content": answer},
    ]
    record["original_answers"] = [inst.original_answer]
    return Outcome(inst.id, inst.source, record=record)
