"""The `sglang` extra pins a set that the pinned SGLang itself asks for (read from its installed
metadata: the Makefile installs sglang with --no-deps), so a GPU install resolves without conflict."""

from __future__ import annotations

import importlib.metadata as md
import re

import pytest

from kernels_cfg import tomllib
from tests.conftest import REPO


def _name(req: str) -> str:
    return re.split(r"[\s\[=<>!;~]", req, maxsplit=1)[0].lower().replace("_", "-")


def test_sglang_extra_pins_match_sglangs_own_requirements():
    try:
        theirs = md.requires("sglang") or []
        version = md.version("sglang")
    except md.PackageNotFoundError:
        pytest.skip("sglang is not installed (make setup installs it with --no-deps)")
    ours = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["sglang"]
    pins = {_name(r): r.replace(" ", "") for r in ours}
    assert pins["sglang"] == f"sglang=={version}"
    required = {_name(r): r.split(";")[0].replace(" ", "") for r in theirs}
    for name, pin in pins.items():
        if name == "sglang":
            continue
        assert name in required, f"{name} is pinned in the sglang extra but sglang {version} does not need it"
        want = required[name].split("==")[-1]
        assert pin.endswith(f"=={want}"), f"{pin} disagrees with sglang {version}'s {required[name]}"
