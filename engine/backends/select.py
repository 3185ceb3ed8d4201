"""Which backend a run gets, and which GPU it runs on: decided without importing torch or sglang.

`choose_backend("auto")` is SGLang in-process when a CUDA GPU and a full SGLang install are both
there, else the CPU `openvino` backend (OpenVINO GenAI). Explicit choices are checked too, so a run
asking for `sglang` on a machine without it fails before any model loads, with the fix in the message.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from typing import Literal, get_args

BackendName = Literal["auto", "openvino", "sglang", "sglang_http", "vllm_http", "openai"]
_NAMES: tuple[str, ...] = get_args(BackendName)

SGLANG_INSTALL_HINT = "pip install -e '.[sglang]' (on a Linux machine with an NVIDIA GPU and CUDA)"


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def sglang_installed() -> bool:
    """True when SGLang and its CUDA kernels are installed. `sgl_kernel` (package sglang-kernel)
    is checked too: the test setup installs the sglang wheel alone, without it, to read its source,
    and that install cannot run an engine."""
    return _has_module("sglang") and _has_module("sgl_kernel")


def detect_gpu() -> str | None:
    """Name of the first CUDA GPU ("NVIDIA H100 80GB HBM3"), or None when there is none.

    nvidia-smi first: it answers in milliseconds and needs no torch; torch only as a fallback."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=name", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            out = None
        if out is not None and out.returncode == 0:
            names = [line.strip() for line in out.stdout.splitlines() if line.strip()]
            if names:
                return names[0]
    if _has_module("torch"):
        import torch  # only reached when nvidia-smi is absent or failed

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    return None


def choose_backend(
    requested: BackendName,
    *,
    cuda_available: bool | None = None,
    sglang_available: bool | None = None,
) -> tuple[str, str]:
    """(backend name, one-sentence reason). Raises ValueError for a choice that cannot run here.

    `cuda_available` / `sglang_available` default to detection on this machine; tests pass them."""
    if requested not in _NAMES:
        raise ValueError(f"unknown engine {requested!r}; choose one of {', '.join(_NAMES)}")
    if requested in ("openvino", "sglang_http", "vllm_http", "openai"):
        where = {
            "openvino": "on the CPU",
            "sglang_http": "on a remote SGLang server or router",
            "vllm_http": "on a remote vLLM server or router",
            "openai": "on an OpenAI-compatible endpoint",
        }[requested]
        return requested, f"engine {requested!r} was asked for explicitly; it runs {where}."
    has_cuda = _cuda_now() if cuda_available is None else cuda_available
    has_sglang = sglang_installed() if sglang_available is None else sglang_available
    if requested == "sglang":
        if not has_sglang:
            raise ValueError(f"--engine sglang needs SGLang, which is not installed: {SGLANG_INSTALL_HINT}")
        if not has_cuda:
            raise ValueError(
                "--engine sglang needs a CUDA GPU and none was found (nvidia-smi lists none); "
                "use --engine openvino on this machine, or --engine sglang_http --url URL "
                "for a GPU server"
            )
        return "sglang", "engine 'sglang' was asked for and a CUDA GPU and SGLang are both present."
    if has_cuda and has_sglang:
        return "sglang", "a CUDA GPU and SGLang are both present, so the in-process SGLang engine runs."
    if has_cuda:
        return "openvino", (
            f"a CUDA GPU is present but SGLang is not installed ({SGLANG_INSTALL_HINT}), "
            "so the CPU engine (openvino) runs."
        )
    return "openvino", "no CUDA GPU was found, so the CPU engine (openvino) runs."


def _cuda_now() -> bool:
    return detect_gpu() is not None
