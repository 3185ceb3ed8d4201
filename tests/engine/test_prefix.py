"""The shared template is tokenized once; the concatenation must equal tokenizing the whole prompt."""

from __future__ import annotations

import copy

import pytest

from engine.prefix import ChatPrompter
from sysgen import prompts
from sysgen.datasets import iter_instances
from sysgen.phases import show_conversation
from tests.conftest import REPO

# Chat templates of other model families, rendered with SmolLM2's vocabulary plus their special
# tokens, so the split logic is exercised on headers that differ from ChatML.
LLAMA3 = ("{{ '<|begin_of_text|>' }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + "
          "'<|end_header_id|>\n\n' + m['content'] + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
          "{% endif %}")
MISTRAL = ("{{ '<s>' }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + "
           "' [/INST]' }}{% elif m['role'] == 'system' %}{{ m['content'] + '\n\n' }}{% endif %}{% endfor %}")
PHI = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '<|im_sep|>' + m['content'] + '<|im_end|>' }}"
       "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}")


@pytest.fixture(scope="module", params=["chatml", "llama3", "mistral", "phi4"])
def tokenizer(request, smol_tokenizer):
    tok = copy.deepcopy(smol_tokenizer)
    if request.param == "llama3":
        tok.add_special_tokens({"additional_special_tokens": ["<|begin_of_text|>", "<|start_header_id|>",
                                                              "<|end_header_id|>", "<|eot_id|>"]})
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
    chat.ids(system, "a first sight is tokenized whole")
    a, b = chat.ids(system, "first instance"), chat.ids(system, "second, different instance")
    n = chat.prefix_len(system)
    assert n > 50 and a[:n] == b[:n] and a[n:] != b[n:]


def test_mismatch_disables_split(smol_tokenizer):
    """If a tokenizer ever merged across the split, the prompter must fall back to the whole string."""
    chat = ChatPrompter(smol_tokenizer)
    chat.ids("sys", "x")
    chat.ids("sys", "x")  # seen twice: the split is built
    chat._splits["sys"].prefix_ids = (1, 2, 3)  # corrupt it as a merge across the boundary would
    chat._splits["sys"].checked = 0
    got = chat.ids("sys", "hello")
    assert got == tuple(chat.encode(chat.render("sys", "hello")))
    assert not chat._splits["sys"].ok


def test_one_off_system_texts_are_not_split_or_kept(smol_tokenizer):
    """P4's system message differs per instance: splitting it cost two extra tokenizations each time
    and kept every one in memory (806k entries at the paper's scale)."""
    from engine import prefix

    chat = ChatPrompter(smol_tokenizer)
    calls = []
    encode = chat.encode
    chat.encode = lambda text: calls.append(text) or encode(text)
    for i in range(prefix.MAX_SPLITS + 50):
        system = f"You are assistant number {i}."
        assert chat.ids(system, "hi") == tuple(encode(chat.render(system, "hi")))
    assert len(calls) == prefix.MAX_SPLITS + 50, "one tokenization per one-off prompt"
    assert not chat._splits and len(chat._seen_once) <= prefix.MAX_SPLITS
