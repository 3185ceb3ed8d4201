import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sysgen import tags
from sysgen.tags import PHRASE_MAX, TAGS, filter_tags, p1_regex, p3_regex, parse_verdicts, strip_tags

phrase = st.from_regex(tags.PHRASE_RE, fullmatch=True)
tag_subset = st.lists(st.sampled_from(TAGS), min_size=1, unique=True).map(
    lambda ts: [t for t in TAGS if t in ts]
)


@st.composite
def tagged(draw):
    return {t: draw(phrase) for t in draw(tag_subset)}


@given(tagged())
@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@pytest.mark.slow
def test_structured_messages_match_p1_and_parse_whole(phrases):
    text = "".join(f"<{t}>{p}</{t}>\n" for t, p in phrases.items())
    assert re.fullmatch(p1_regex(), text)
    f = filter_tags(text)
    assert f.well_formed and not f.dropped
    assert f.tags == {t: p.rstrip(" \t") for t, p in phrases.items()}


@given(st.from_regex(p1_regex(), fullmatch=True))
@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
def test_every_string_the_p1_regex_admits_parses(text):
    f = filter_tags(text)
    assert f.tags or f.dropped, text
    # The regex leaves phrase length to P2 (a bounded repeat is ~100x dearer in xgrammar): the only
    # thing P2 may drop from an admitted string is an overlong phrase.
    assert all(reason == "too_long" for _, reason in f.dropped), f.dropped
    assert f.well_formed == (not f.dropped)


def test_overlong_phrase_is_admitted_by_the_regex_and_dropped_by_p2():
    text = "<Role>" + "x" * (PHRASE_MAX + 1) + "</Role>\n<Task>Answer.</Task>\n"
    assert re.fullmatch(p1_regex(), text)
    f = filter_tags(text)
    assert f.tags == {"Task": "Answer."}
    assert f.dropped == [("Role", "too_long")]
    exact = "<Role>" + "x" * PHRASE_MAX + "</Role>\n"
    assert filter_tags(exact).tags == {"Role": "x" * PHRASE_MAX}


_pieces = list("<>/\n aRoleTskFm") + [f"<{t}>" for t in TAGS] + [f"</{t}>" for t in TAGS]


@given(st.lists(st.sampled_from(_pieces), max_size=80).map("".join))
@settings(max_examples=300)
def test_p2_of_p2_is_p2(text):
    once = filter_tags(text)
    twice = filter_tags(once.render())
    assert twice.tags == once.tags
    assert not twice.dropped


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "<Format>x</Format>\n<Role>y</Role>\n",  # out of order
        "<Role>a</Role>\n<Role>b</Role>\n",  # duplicate
        "<Role>a\nb</Role>\n",  # newline inside
        "<Role>a</Role>",  # no final newline
        "<Role> </Role>\n",  # blank phrase
        "<Role>a <b></Role>\n",  # nested markup
        "<Persona>a</Persona>\n",  # unknown tag
    ],
)
def test_p1_regex_rejects(bad):
    assert re.fullmatch(p1_regex(), bad) is None


def test_filter_drops_with_reasons_and_reorders():
    text = (
        "<Format>Use a list.</Format>\n<Role>You are a chef.</Role>\n<Role>Again.</Role>\n"
        "<Style></Style>\n<Persona>x</Persona>\n<Task>Cook</Tsk>\nsome chatter\n<Tool>a <b> c</Tool>\n"
    )
    f = filter_tags(text)
    assert list(f.tags) == ["Role", "Format"]
    assert f.tags["Role"] == "You are a chef."
    reasons = sorted(r for _, r in f.dropped)
    assert reasons == sorted(
        ["duplicate", "empty", "unknown_tag", "mismatched_close", "malformed", "nested_markup"]
    )
    assert not f.well_formed


def test_p3_regex_and_verdicts():
    rx = p3_regex(["Role", "Format"])
    assert re.fullmatch(rx, "Role: Good\nFormat: Bad\n")
    assert not re.fullmatch(rx, "Format: Bad\nRole: Good\n")
    assert not re.fullmatch(rx, "Role: Great\nFormat: Bad\n")
    verdicts = parse_verdicts("Role: Good\nFormat: Bad\n", ["Role", "Format"])
    assert verdicts == {"Role": "Good", "Format": "Bad"}
    # unconstrained chatter: lenient, and an unjudged tag is "None"
    got = parse_verdicts("Sure!\n**Role**: good, fits.\n", ["Role", "Format"])
    assert got == {"Role": "Good", "Format": "None"}


def test_strip_tags_natural_text_in_fixed_order():
    s = strip_tags({"Format": "end with the final answer", "Role": "You are a tutor."})
    assert s == "You are a tutor. End with the final answer."
    assert "<" not in s


@given(tag_subset, st.data())
@settings(max_examples=100)
def test_p3_token_bound_covers_the_longest_admitted_answer_in_single_characters(present, data):
    longest = "".join(f"{t}: {max(tags.VERDICTS, key=len)}\n" for t in present)
    assert re.fullmatch(p3_regex(present), longest)
    answer = "".join(f"{t}: {data.draw(st.sampled_from(tags.VERDICTS))}\n" for t in present)
    # one character per token, plus end-of-sequence: the worst tokenization still fits
    assert len(answer) + 1 <= len(longest) + 1 == tags.p3_token_bound(present)


_line_piece = st.one_of(
    st.sampled_from([f"<{t}>" for t in TAGS] + [f"</{t}>" for t in TAGS] + ["<role>", "<Tone>", "</Tone>"]),
    st.from_regex(tags.PHRASE_RE, fullmatch=True),
    st.sampled_from(["\n", " ", "\t", "\r", "\u2028", "\u00a0", "", "x" * 301, "<", ">"]),
)


@given(
    st.one_of(
        st.from_regex(p1_regex(), fullmatch=True),
        st.lists(_line_piece, max_size=24).map("".join),
        tagged().map(lambda d: "".join(f"<{t}>{p}</{t}>\n" for t, p in d.items()) * 2),
    )
)
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@pytest.mark.slow
def test_the_one_pass_parse_agrees_with_the_line_by_line_parse(text):
    """filter_tags parses well-formed output in one regex pass; the line-by-line parse must agree
    on everything, well-formed or not (duplicates, overlong phrases, stray blanks, unknown tags)."""
    fast, slow = filter_tags(text), tags._filter_lines(text)
    assert (fast.tags, fast.dropped, fast.well_formed) == (slow.tags, slow.dropped, slow.well_formed)
    assert list(fast.tags) == list(slow.tags)


def _verdicts_line_by_line(text, present):  # the reference: every line through the loose _VERDICT
    wanted, out = {t.lower(): t for t in present}, {}
    for raw in text.splitlines():
        m = tags._VERDICT.match(raw)
        if m and (tag := wanted.get(m.group(1).lower())) and tag not in out:
            out[tag] = m.group(2).capitalize()
    return {t: out.get(t, "None") for t in present}


_verdict_piece = st.one_of(
    st.builds(
        lambda t, v: f"{t}: {v}",
        st.sampled_from(TAGS + ("role", "Tone")),
        st.sampled_from(("Good", "Bad", "None", "good", "BAD", "Goodish")),
    ),
    st.sampled_from(["\n", "\r\n", "\u2028", " ", "**", "-", ":", ""]),
)


@given(st.lists(_verdict_piece, max_size=20).map("".join), tag_subset)
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@pytest.mark.slow
def test_the_one_pass_verdict_parse_agrees_with_the_line_by_line_parse(text, present):
    assert parse_verdicts(text, present) == _verdicts_line_by_line(text, present)
    exact = "".join(f"{t}: Good\n" for t in present)
    assert parse_verdicts(exact, present) == _verdicts_line_by_line(exact, present)
