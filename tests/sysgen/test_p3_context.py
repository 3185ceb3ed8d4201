"""`--p3-context`: standalone P3 is the request sysgen always made; `continue` makes P3 the next turn
of P1's chat, so its ids extend P1's prompt + answer and a radix-style cache serves that whole part."""

from __future__ import annotations

from collections import Counter

import pytest

from engine.request import Request, SamplingParams, prompt_messages
from sysgen import prompts, tags
from sysgen.config import RunConfig
from sysgen.datasets import iter_instances
from sysgen.run.phases import (
    P1Turn,
    PhaseSettings,
    PromptBuilder,
    p1_request,
    p1_system,
    p1_user_text,
    p3_request,
)
from sysgen.run.resume import fingerprint

try:
    from tests.sysgen.pipeline_helpers import backend, records, run, write_rows
    from tests.sysgen.test_multiturn import capybara_rows, write
    from tests.sysgen.test_multiturn_tokens import RadixStandIn
except ImportError:  # tests/sysgen is not a package: pytest put its folder on sys.path
    from pipeline_helpers import backend, records, run, write_rows
    from test_multiturn import capybara_rows, write
    from test_multiturn_tokens import RadixStandIn

P1_TEXT = "<Role>You are a patient tutor.</Role>\n<Task>Explain sorting step by step.</Task>\n"


def _inst(tmp_path):
    write(tmp_path / "in.jsonl", capybara_rows(1, turns=1))
    return next(iter_instances([str(tmp_path / "in.jsonl")]))


def test_continued_p3_ids_extend_p1_prompt_and_answer(tmp_path, smol_tokenizer):
    build, s = PromptBuilder(smol_tokenizer), PhaseSettings(model_id="m", p3_context="continue")
    inst = _inst(tmp_path)
    req1 = p1_request(inst, build, s)
    filtered = tags.filter_tags(P1_TEXT)
    req3 = p3_request(filtered, build, s, P1Turn(req1.prompt, p1_user_text(inst, s), P1_TEXT))
    answer = build.chat.encode_data([P1_TEXT])[0]
    n = len(req1.prompt)
    assert req3.prompt[:n] == req1.prompt
    assert list(req3.prompt[n : n + len(answer)]) == answer
    end = smol_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert req3.prompt[n + len(answer)] == end  # the answer's turn is closed, then the P3 turn
    # The whole P3 instructions and the message ride in the new user turn; regex and budget as standalone.
    shown = smol_tokenizer.decode(list(req3.prompt[n:]))
    assert prompts.load("p3_verify") in shown and filtered.render() in shown
    alone = p3_request(filtered, build, PhaseSettings(model_id="m"))
    assert (req3.regex, req3.sampling) == (alone.regex, alone.sampling)
    assert req3.key != alone.key


def test_continued_p3_with_chat_messages_is_the_same_conversation(tmp_path):
    build, s = PromptBuilder(None), PhaseSettings(model_id="m", p3_context="continue")
    inst = _inst(tmp_path)
    req1 = p1_request(inst, build, s)
    filtered = tags.filter_tags(P1_TEXT)
    req3 = p3_request(filtered, build, s, P1Turn(req1.prompt, p1_user_text(inst, s), P1_TEXT))
    msgs = prompt_messages(req3.prompt)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert msgs[:2] == prompt_messages(req1.prompt) and msgs[2]["content"] == P1_TEXT
    alone = prompt_messages(p3_request(filtered, build, PhaseSettings(model_id="m")).prompt)
    assert msgs[3]["content"].endswith(prompts.load("p3_verify") + "\n\n" + alone[1]["content"])


def test_chat_puts_p3_instructions_in_p1_system_and_p3_sends_only_the_message(tmp_path, smol_tokenizer):
    build, s = PromptBuilder(smol_tokenizer), PhaseSettings(model_id="m", p3_context="chat")
    inst = _inst(tmp_path)
    req1 = p1_request(inst, build, s)
    system = prompt_messages(p1_request(inst, PromptBuilder(None), s).prompt)[0]["content"]
    assert system == p1_system(s) and system.startswith(prompts.load("p1_generate"))
    assert system.endswith(prompts.load("p3_verify"))  # the shared prefix holds both templates
    alone1 = p1_request(inst, build, PhaseSettings(model_id="m"))
    assert req1.key != alone1.key and req1.regex == alone1.regex and req1.sampling == alone1.sampling

    n = len(req1.prompt)
    answer = build.chat.encode_data([P1_TEXT])[0]
    filtered = tags.filter_tags(P1_TEXT)  # P2 changes nothing: the annotated message is P1's answer above
    req3 = p3_request(filtered, build, s, P1Turn(req1.prompt, p1_user_text(inst, s), P1_TEXT))
    assert req3.prompt[:n] == req1.prompt and list(req3.prompt[n : n + len(answer)]) == answer
    turn = smol_tokenizer.decode(list(req3.prompt[n + len(answer) :]))
    assert prompts.load("p3_verify") not in turn and tags.strip_tags(filtered.tags) in turn
    assert filtered.render() not in turn and "you wrote above" in turn
    standalone = p3_request(filtered, build, PhaseSettings(model_id="m"))
    assert (req3.regex, req3.sampling) == (standalone.regex, standalone.sampling)
    new_chat = len(req3.prompt) - n - len(answer)
    new_alone = len(standalone.prompt) - len(build.chat.ids(prompts.load("p3_verify"), ""))
    assert new_chat < new_alone + 40  # about what standalone adds after its template, not P3's template

    # P2 reordered and dropped a tag: the message as judged differs from the answer, so it is sent.
    messy = (
        "<Task>Explain sorting step by step.</Task>\n<Role>You are a patient tutor.</Role>\n"
        "<Bogus>x</Bogus>\n"
    )
    filtered = tags.filter_tags(messy)
    req3 = p3_request(filtered, build, s, P1Turn(req1.prompt, p1_user_text(inst, s), messy))
    assert filtered.render() in smol_tokenizer.decode(list(req3.prompt[n:]))


def test_chat_is_served_from_the_cache_of_p1_and_keeps_every_row(tmp_path, smol_tokenizer):
    write(tmp_path / "in.jsonl", capybara_rows(6, turns=1))
    ratio = {}
    for mode in ("standalone", "chat"):
        eng = RadixStandIn(smol_tokenizer)
        counters = run([tmp_path / "in.jsonl"], tmp_path / mode, eng, turns="first", p3_context=mode)
        assert len(records(tmp_path / mode)["data"]) == 6
        by = counters["scheduler"]["by_phase"]
        ratio[mode] = (
            by["p3"]["cached_tokens"] / by["p3"]["prompt_tokens"],
            by["p3"]["prompt_tokens"] - by["p3"]["cached_tokens"],
        )
    assert ratio["chat"][0] > 0.8 > ratio["standalone"][0]
    assert ratio["chat"][1] < ratio["standalone"][1] * 1.5  # new P3 tokens: the message, not the template


def test_standalone_p3_is_the_request_sysgen_always_made(smol_tokenizer):
    build = PromptBuilder(smol_tokenizer)
    filtered = tags.filter_tags(P1_TEXT)
    user = prompts.load("p3_user").format(
        filtered=tags.strip_tags(filtered.tags), annotated=filtered.render()
    )
    present = list(filtered.tags)
    want = Request(
        prompt=build.chat.ids(prompts.load("p3_verify"), user),
        sampling=SamplingParams(max_new_tokens=tags.p3_token_bound(present)),
        model="m",
        regex=tags.p3_regex(present),
        group="p3",
    )
    for s in (PhaseSettings(model_id="m"), PhaseSettings(model_id="m", p3_context="standalone")):
        assert p3_request(filtered, build, s).key == want.key
    # `continue` without P1's turn at hand (never in a run) is standalone, not a half-built chat
    assert p3_request(filtered, build, PhaseSettings(model_id="m", p3_context="continue")).key == want.key


def test_fingerprint_keeps_earlier_runs_for_standalone_and_names_continue(tmp_path):
    cfg = RunConfig(inputs=("x.jsonl",), out=str(tmp_path))
    old = PhaseSettings(model_id="m")
    legacy = {k: v for k, v in old.__dict__.items() if k != "p3_context"}

    class Legacy:  # the settings object as it was before --p3-context
        __dict__ = legacy

    assert fingerprint(cfg, old) == fingerprint(cfg, Legacy())  # type: ignore[arg-type]
    assert fingerprint(cfg, PhaseSettings(model_id="m", p3_context="continue")) != fingerprint(cfg, old)
    assert fingerprint(cfg, PhaseSettings(model_id="m", p3_context="chat")) not in (
        fingerprint(cfg, old),
        fingerprint(cfg, PhaseSettings(model_id="m", p3_context="continue")),
    )


def test_continue_is_served_from_the_cache_of_p1(tmp_path, smol_tokenizer):
    write(tmp_path / "in.jsonl", capybara_rows(6, turns=1))
    ratios = {}
    for mode in ("standalone", "continue"):
        eng = RadixStandIn(smol_tokenizer)
        seen: list[tuple[str, tuple[int, ...], str, int]] = []
        inner = eng.generate

        async def generate(request, inner=inner, seen=seen):
            res = await inner(request)
            seen.append((request.group, tuple(request.prompt), res.text, res.cached_tokens))
            return res

        eng.generate = generate
        counters = run([tmp_path / "in.jsonl"], tmp_path / mode, eng, turns="first", p3_context=mode)
        assert len(records(tmp_path / mode)["data"]) == 6
        p1 = [(p, len(eng.chat.encode_data([t])[0])) for g, p, t, _ in seen if g == "p1"]
        p3 = [(p, c) for g, p, _, c in seen if g == "p3"]
        assert len(p1) == len(p3) == 6
        by = counters["scheduler"]["by_phase"]
        ratios[mode] = (by["p1"]["cached_tokens"] + by["p3"]["cached_tokens"]) / (
            by["p1"]["prompt_tokens"] + by["p3"]["prompt_tokens"]
        )
        for prompt, cached in p3:
            mine = [(pp, n) for pp, n in p1 if prompt[: len(pp)] == pp]
            if mode == "standalone":
                assert not mine and cached < min(len(pp) for pp, _ in p1)
            else:
                ((pp, n_ans),) = mine
                assert cached >= len(pp) + n_ans  # P1's prompt and answer, all from cache
    assert ratios["continue"] > ratios["standalone"]


def test_resume_with_continue_makes_no_engine_calls(tmp_path):
    write_rows(tmp_path / "in.jsonl", 12)
    calls: Counter = Counter()
    run([tmp_path / "in.jsonl"], tmp_path / "out", backend(calls), p3_context="continue")
    assert calls["p3"] > 0
    first = records(tmp_path / "out")
    again: Counter = Counter()
    run([tmp_path / "in.jsonl"], tmp_path / "out", backend(again), p3_context="continue")
    assert sum(again.values()) == 0
    assert records(tmp_path / "out") == first


def test_resume_with_continue_and_token_ids_makes_no_engine_calls(tmp_path, smol_tokenizer):
    write(tmp_path / "in.jsonl", capybara_rows(4, turns=2))
    eng = RadixStandIn(smol_tokenizer)
    run([tmp_path / "in.jsonl"], tmp_path / "out", eng, p3_context="continue")
    assert eng.seen and len(records(tmp_path / "out")["data"]) == 4
    again = RadixStandIn(smol_tokenizer)
    run([tmp_path / "in.jsonl"], tmp_path / "out", again, p3_context="continue")
    assert again.seen == []


@pytest.mark.parametrize("bad", ["both", ""])
def test_unknown_layout_is_refused_by_the_cli(bad, tmp_path, capsys):
    from sysgen.cli import main

    assert main(["run", "x.jsonl", "--out", str(tmp_path), "--p3-context", bad]) == 2
    assert "--p3-context" in capsys.readouterr().err
