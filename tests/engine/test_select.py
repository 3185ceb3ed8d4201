"""Backend choice: auto picks sglang only with both CUDA and SGLang, explicit choices fail early with
the fix, and GPU detection reads nvidia-smi without torch."""

from __future__ import annotations

import os
import stat

import pytest

from engine.backends import select
from engine.backends.select import choose_backend, detect_gpu


@pytest.mark.parametrize(
    "cuda,sgl,want",
    [
        (True, True, "sglang"),
        (True, False, "openvino"),
        (False, True, "openvino"),
        (False, False, "openvino"),
    ],
)
def test_auto(cuda, sgl, want):
    name, reason = choose_backend("auto", cuda_available=cuda, sglang_available=sgl)
    assert name == want
    assert reason.endswith(".") and "\n" not in reason
    if cuda and not sgl:
        assert "pip install -e '.[sglang]'" in reason


def test_explicit_sglang_without_gpu_or_package_fails_with_the_fix():
    with pytest.raises(ValueError, match=r"pip install -e '\.\[sglang\]'"):
        choose_backend("sglang", cuda_available=True, sglang_available=False)
    with pytest.raises(ValueError, match="--engine openvino"):
        choose_backend("sglang", cuda_available=False, sglang_available=True)
    assert choose_backend("sglang", cuda_available=True, sglang_available=True)[0] == "sglang"


@pytest.mark.parametrize("name", ["openvino", "sglang_http", "openai"])
def test_explicit_choices_need_no_detection(name, monkeypatch):
    monkeypatch.setattr(select, "detect_gpu", lambda: pytest.fail("detection ran"))
    assert choose_backend(name)[0] == name


def test_unknown_engine():
    with pytest.raises(ValueError, match="unknown engine"):
        choose_backend("vllm")  # type: ignore[arg-type]


def _fake_smi(tmp_path, body: str):
    smi = tmp_path / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\n{body}\n")
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    return str(tmp_path)


def test_detect_gpu_reads_nvidia_smi(tmp_path, monkeypatch):
    two_gpus = "echo 'NVIDIA H100 80GB HBM3'; echo 'NVIDIA H100 80GB HBM3'"
    monkeypatch.setenv("PATH", _fake_smi(tmp_path, two_gpus))
    assert detect_gpu() == "NVIDIA H100 80GB HBM3"


def test_detect_gpu_none_when_smi_fails_and_no_cuda(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", _fake_smi(tmp_path, "exit 9") + os.pathsep + "/nonexistent")
    monkeypatch.setattr(select, "_has_module", lambda name: False)  # no torch either
    assert detect_gpu() is None
    assert choose_backend("auto", sglang_available=True)[0] == "openvino"


def test_sglang_installed_needs_the_kernels_too(monkeypatch):
    monkeypatch.setattr(select, "_has_module", lambda name: name == "sglang")
    assert not select.sglang_installed()
    monkeypatch.setattr(select, "_has_module", lambda name: name in ("sglang", "sgl_kernel"))
    assert select.sglang_installed()
