"""Phase requests: what each phase asks the engine for, and with which budget and constraint."""

from __future__ import annotations

from sysgen import tags
from sysgen.run.phases import PhaseSettings, PromptBuilder, p3_request

FILTERED = tags.filter_tags(
    "<Role>You are a tutor.</Role>\n<Background>The user is ten.</Background>\n"
    "<Format>Numbered steps.</Format>\n"
)


def test_constrained_p3_budget_is_the_bound_of_its_verdict_form():
    req = p3_request(FILTERED, PromptBuilder(None), PhaseSettings(model_id="m", p3_max_tokens=5))
    assert req.regex == tags.p3_regex(["Role", "Background", "Format"])
    # "Role: None\n" + "Background: None\n" + "Format: None\n" = 11 + 17 + 13 characters, + EOS
    assert req.sampling.max_new_tokens == 42 == tags.p3_token_bound(["Role", "Background", "Format"])


def test_unconstrained_p3_uses_the_configured_budget():
    req = p3_request(
        FILTERED, PromptBuilder(None), PhaseSettings(model_id="m", constrain=False, p3_max_tokens=77)
    )
    assert req.regex is None and req.sampling.max_new_tokens == 77
