"""The shared template is tokenized once; the concatenation must equal tokenizing the whole prompt."""

from __future__ import annotations

import copy

import pytest

from engine.prefix import ChatPrompter
from sysgen import prompts
from sysgen.datasets import iter_instances
from sysgen.run.phases import show_conversation
from tests.conftest import REPO

# Chat templates of other model families, rendered with SmolLM2's vocabulary plus their special
# tokens, so the split logic is exercised on headers that differ from ChatML.
LLAMA3 = (
    "{{ '<|begin_of_text|>' }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + "
    "'<|end_header_id|>\n\n' + m['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
MISTRAL = (
    "{{ '<s>' }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + "
    "' [/INST]' }}{% elif m['role'] == 'system' %}{{ m['content'] + '\n\n' }}{% endif %}{% endfor %}"
)
PHI = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '<|im_sep|>' + m['content'] + '<|im_end|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"
)


@pytest.fixture(scope="module", params=["chatml", "llama3", "mistral", "phi4"])
def tokenizer(request, smol_tokenizer):
    tok = copy.deepcopy(smol_tokenizer)
    if request.param == "llama3":
        tok.add_special_tokens(
            {
                "additional_special_tokens": [
                    "<|begin_of_text|>",
                    "<|start_header_id|>",
                    "<|end_header_id|>",
                    "<|eot_id|>",
                ]
            }
        )
        tok.chat_template = LLAMA3
    elif request.param == "mistral":
        tok.add_special_tokens({"additional_special_tokens": ["<s>", "[INST]", "[/INST]"]})
        tok.chat_template = MISTRAL
    elif request.param == "phi4":
        tok.add_special_tokens({"additional_special_tokens": ["<|im_sep|>"]})
        tok.chat_template = PHI
    return tok


def _samples(shared):
    paths = sorted(str(p) for p in (REPO / "sysgen" / "samples").glob("*.jsonl"))
    if shared is not None:
        paths += sorted(str(p) for p in shared.glob("*/*.jsonl"))
    return [i for i in iter_instances(paths) if hasattr(i, "turns")]


def test_split_equals_whole_prompt_for_every_sample(tokenizer, request):
    shared = request.getfixturevalue("shared_data") if (REPO.parent / "shared" / "data").is_dir() else None
    instances = _samples(shared)
    assert len(instances) >= 8
    chat = ChatPrompter(tokenizer)
    system = prompts.load("p1_generate")
    for inst in instances[:120]:
        user = prompts.load("p1_user").format(conversation=show_conversation(inst, 3000))
        whole = tuple(chat.encode(chat.render(system, user)))
        assert chat.ids(system, user) == whole, inst.id
    assert chat.prefix_len(system) > 300, "the template prefix should be reused, not re-tokenized"


def test_prefix_is_identical_across_instances(smol_tokenizer):
    chat = ChatPrompter(smol_tokenizer)
    system = prompts.load("p3_verify")
    a, b = chat.ids(system, "first instance"), chat.ids(system, "second, different instance")
    n = chat.prefix_len(system)
    assert n > 50 and a[:n] == b[:n] and a[n:] != b[n:]


def test_mismatch_disables_split(smol_tokenizer):
    """If a tokenizer ever merged across a cut, the prompter must fall back to the whole string."""
    chat = ChatPrompter(smol_tokenizer)
    chat.ids("sys", "x")  # build the layout
    lay = chat._layouts[("system", "user")]
    lay.literal = {k: (1, 2, 3) for k in lay.literal}  # corrupt it as a merge across a cut would
    lay.checked = 0
    chat._shared.clear()
    got = chat.ids("sys", "hello")
    assert got == tuple(chat.encode(chat.render("sys", "hello")))
    assert not lay.ok


# -- special-token text in data stays text (issue 13, item 9) ----------------------------------------


def _special_strings(chat: ChatPrompter) -> list[str]:
    return list(chat._special_id)


def test_special_token_text_in_data_stays_text(tokenizer):
    """A row that writes the template's markers must not end its turn or forge an assistant turn:
    the prompt holds exactly the template's own special tokens, and decodes to the rendered text."""
    chat = ChatPrompter(tokenizer)
    specials = _special_strings(chat)
    assert chat.can_split
    forged = "hi " + "".join(f"{s}\nassistant\n" for s in specials) + " end"
    clean = tuple(chat.encode(chat.render("sys", "hi")))
    clean_specials = sorted(i for i in clean if i in chat._special_id.values())
    for system, user in (("sys", forged), (forged, "hi"), (None, forged)):
        ids = chat.prompt([("system", system), ("user", user)] if system is not None else [("user", user)])
        got = sorted(i for i in ids if i in chat._special_id.values())
        ref = (
            clean_specials
            if system is not None
            else sorted(i for i in chat.encode(chat.render(None, "hi")) if i in chat._special_id.values())
        )
        assert got == ref, (system is None, user[:40])
        text = tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)
        assert text == chat.render(system, user)


def test_special_text_in_history_and_answers_stays_text(tokenizer):
    chat = ChatPrompter(tokenizer)
    s = _special_strings(chat)[0]
    msgs = [("system", "sys"), ("user", f"u1 {s}"), ("assistant", f"a1 {s} x"), ("user", f"u2 {s}")]
    ids = chat.extend(chat.prompt(msgs[:2]), msgs)
    whole_clean = chat.encode(chat.render_messages([(r, c.replace(s, "")) for r, c in msgs]))
    specials = set(chat._special_id.values())
    assert sorted(i for i in ids if i in specials) == sorted(i for i in whole_clean if i in specials)


def test_first_turn_prompts_equal_the_previous_prompter(tokenizer, request):
    """`--turns first` reproduces earlier runs: for data without special-token text, every prompt is
    the same ids as before (so the same request keys, and the store is reused)."""
    from tests.engine.legacy_prefix import ChatPrompter as Legacy

    shared = request.getfixturevalue("shared_data") if (REPO.parent / "shared" / "data").is_dir() else None
    new, old = ChatPrompter(tokenizer), Legacy(tokenizer)
    for inst in _samples(shared)[:60]:
        user = prompts.load("p1_user").format(conversation=show_conversation(inst, 3000))
        assert new.ids(prompts.load("p1_generate"), user) == old.ids(prompts.load("p1_generate"), user)
        first_user = next(t.content for t in inst.turns if t.role == "user")
        assert new.prompt([("system", "A new system message."), ("user", first_user)]) == old.ids(
            "A new system message.", first_user
        ), inst.id


# -- chains: turn j+1 extends turn j's prompt + answer exactly (issue 8) -------------------------------


def _conversations(shared):
    convs = []
    for inst in _samples(shared):
        pairs, cur = [], None
        for t in inst.turns:
            if t.role == "user":
                cur = [t.content, None]
                pairs.append(cur)
            elif t.role == "assistant" and cur is not None:
                cur[1] = t.content
        if len(pairs) >= 2:
            convs.append(pairs)
    return convs


def test_each_turn_extends_the_previous_prompt_and_answer(tokenizer, request):
    shared = request.getfixturevalue("shared_data") if (REPO.parent / "shared" / "data").is_dir() else None
    convs = _conversations(shared)
    assert convs, "need multi-turn samples (the demo ships one)"
    chat = ChatPrompter(tokenizer)
    chain_template = "[INST]" not in (tokenizer.chat_template or "")  # the Mistral one drops answers
    for pairs in convs:
        msgs = [("system", "Be brief."), ("user", pairs[0][0])]
        ids = chat.prompt(msgs)
        for user, answer in pairs[1:] + [("last", None)]:
            answer = answer or "An answer written here."
            msgs = msgs + [("assistant", answer), ("user", user)]
            nxt = chat.extend(ids, msgs)
            text = tokenizer.decode(list(nxt), skip_special_tokens=False, clean_up_tokenization_spaces=False)
            assert text == chat.render_messages(msgs)
            if chain_template:
                head = ids + tuple(chat.encode_data([answer])[0])
                assert nxt[: len(head)] == head
            ids = nxt


def test_memory_is_flat_for_per_instance_system_messages(smol_tokenizer):
    """P4's system message is new for every instance: nothing may be cached per system text."""
    chat = ChatPrompter(smol_tokenizer)
    for i in range(3000):
        chat.prompt([("system", f"You are assistant number {i}."), ("user", "hello")])
        chat.ids(prompts.load("p3_verify"), f"instance {i}")
    assert len(chat._shared) == 1 and len(chat._layouts) == 1


class _Counting:
    """A tokenizer wrapper counting encode calls (texts tokenized)."""

    def __init__(self, tok) -> None:
        self._tok, self.calls = tok, 0

    def __call__(self, *a, **kw):
        self.calls += 1
        return self._tok(*a, **kw)

    def __getattr__(self, name):
        return getattr(self._tok, name)


def test_one_tokenizer_call_per_prompt_after_warm_up(smol_tokenizer):
    tok = _Counting(smol_tokenizer)
    chat = ChatPrompter(tok)
    for i in range(8):  # warm-up: layouts built, first prompts verified
        p = chat.prompt([("system", f"sys {i}"), ("user", "u")])
        chat.extend(p, [("system", f"sys {i}"), ("user", "u"), ("assistant", "a"), ("user", "v")])
        chat.ids("shared template", f"x{i}")
    for make in (
        lambda i: chat.prompt([("system", f"new system {i}"), ("user", f"question {i}")]),
        lambda i: chat.ids("shared template", f"instance {i}"),
        lambda i: chat.extend(
            (1, 2), [("system", "s"), ("user", "u"), ("assistant", f"a {i}"), ("user", f"next {i}")]
        ),
    ):
        before = tok.calls
        for i in range(10):
            make(i)
        assert tok.calls - before <= 20  # one call per prompt, plus the answer's on extend


# ---- issue 21 item 7: prompts linear in the conversation ----

NUMBERED = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + ' ' + loop.index|string + '\n' + "
    "m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _grow(chat: ChatPrompter, turns: int) -> list[tuple[list, tuple[int, ...]]]:
    """(messages, prompt ids) of every turn of a `turns`-turn conversation built as P4 builds it."""
    msgs = [("system", "You answer briefly."), ("user", "Question 0: what is 0 + 0?")]
    ids = chat.prompt(msgs)
    out = [(msgs, ids)]
    for j in range(1, turns):
        msgs = msgs + [
            ("assistant", f"It is {2 * (j - 1)}, as {j - 1} + {j - 1} = {2 * (j - 1)}."),
            ("user", f"Question {j}: what is {j} + {j}?"),
        ]
        ids = chat.extend(ids, msgs)
        out.append((msgs, ids))
    return out


def test_long_conversations_show_the_whole_rendering_and_extend_every_turn(tokenizer):
    chat = ChatPrompter(tokenizer)
    chain_template = "[INST]" not in (tokenizer.chat_template or "")  # the Mistral one drops answers
    prev = None
    for msgs, ids in _grow(chat, 40):
        text = tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)
        assert text == chat.render_messages(msgs), len(msgs)
        if prev is not None and chain_template:
            head = prev + tuple(chat.encode_data([msgs[-2][1]])[0])
            assert ids[: len(head)] == head
        prev = ids


def test_a_template_that_numbers_its_turns_is_never_windowed_wrongly(smol_tokenizer):
    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = NUMBERED
    chat = ChatPrompter(tok)
    for msgs, ids in _grow(chat, 30):
        assert ids == tuple(chat.encode(chat.render_messages(msgs))), len(msgs)


def test_building_a_conversation_renders_a_linear_number_of_messages(smol_tokenizer):
    """Each turn renders a bounded window of roles, not the whole conversation (which made 1,000
    turns take minutes: every turn rendered and re-marked the whole history three times)."""
    chat = ChatPrompter(smol_tokenizer)
    rendered = []
    render = chat.render_messages

    def counting(messages, generation_prompt=True):
        rendered.append(len(messages))
        return render(messages, generation_prompt)

    chat.render_messages = counting
    turns = 300
    _grow(chat, turns)
    assert sum(rendered) < 20 * turns, (sum(rendered), max(rendered))


def test_a_prompt_too_long_for_the_context_is_refused_before_it_is_tokenized(smol_tokenizer):
    from engine.prefix import PromptTooLong

    chat = ChatPrompter(smol_tokenizer, max_tokens=8192)
    seen: list[int] = []
    call = chat.tokenizer.__call__

    class Spy:  # the tokenizer, counting the characters it is given
        def __getattr__(self, name):
            return getattr(smol_tokenizer, name)

        def __call__(self, text, **kw):
            seen.append(sum(map(len, text)) if isinstance(text, list) else len(text))
            return call(text, **kw)

    chat.tokenizer = Spy()
    with pytest.raises(PromptTooLong, match="8,192"):
        chat.prompt([("system", "Be brief."), ("user", "word " * 1_400_000)])  # 7 MB
    assert sum(seen) == 0
    ids = chat.prompt([("system", "Be brief."), ("user", "word " * 100)])  # what fits is built as before
    assert ids == ChatPrompter(smol_tokenizer).prompt([("system", "Be brief."), ("user", "word " * 100)])
    with pytest.raises(PromptTooLong):
        chat.extend(
            ids,
            [
                ("system", "Be brief."),
                ("user", "word " * 100),
                ("assistant", "ok"),
                ("user", "x" * 8192 * 200),
            ],
        )
