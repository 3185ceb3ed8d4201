"""SGLang server arguments per GPU class, with the arithmetic behind each number in the TOML files.

    load_profile("h100-80gb", model_size_b=8, fp8=False)   # by profile name
    load_profile("NVIDIA H100 80GB HBM3", model_size_b=14)  # by GPU name (nvidia-smi)
    load_profile(None)                                      # detect this machine's GPU

A profile file holds `[meta]` (which GPU names it matches), `[server_args]` (8b-class defaults),
`[model_size."<N>b"]` adjustments, and on FP8-capable GPUs `[fp8]` and `[fp8.model_size."<N>b"]`.
They merge in that order, then `overrides`. Every key must be a `ServerArgs` field: an unknown one
is an error (checked against the installed SGLang's source when present, and by the tests against
the pinned version), never silently dropped.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import orjson

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

PROFILE_DIR = Path(__file__).resolve().parent
_TABLES = {"meta", "server_args", "model_size", "fp8"}
_META_KEYS = {"description", "match", "memory_mib", "fp8"}
# A model uses the smallest size class that is at least 90% of its parameter count, so a 9B or
# 10.7B model gets the 14b numbers (less KV per request assumed free), never the 8b ones.
_SIZE_SLACK = 0.9


class ProfileError(ValueError):
    """A profile that cannot be found or is malformed; the message says which file and what to do."""


def list_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def _read(name: str) -> dict[str, Any]:
    path = PROFILE_DIR / f"{name}.toml"
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"{path}: {e}") from e
    _check_structure(data, path)
    return data


def _check_structure(data: dict[str, Any], path: Path) -> None:
    extra = set(data) - _TABLES
    if extra:
        raise ProfileError(f"{path}: unknown table(s) {sorted(extra)}; allowed: {sorted(_TABLES)}")
    meta = data.get("meta", {})
    if set(meta) - _META_KEYS:
        raise ProfileError(f"{path}: unknown [meta] key(s) {sorted(set(meta) - _META_KEYS)}")
    if not isinstance(meta.get("match"), list) or not meta["match"]:
        raise ProfileError(f"{path}: [meta] needs match = ['regex over the GPU name', ...]")
    for size in data.get("model_size", {}):
        if not re.fullmatch(r"\d+(\.\d+)?b", size):
            raise ProfileError(f'{path}: model_size key "{size}" must look like "8b" or "14b"')
    fp8 = data.get("fp8")
    if fp8 is not None and not meta.get("fp8", False):
        raise ProfileError(f"{path}: has an [fp8] table but [meta] fp8 is not true")


def server_arg_tables(data: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(table name, server args) for every table of a parsed profile that holds server args."""
    out = [("server_args", data.get("server_args", {}))]
    out += [(f'model_size."{k}"', v) for k, v in data.get("model_size", {}).items()]
    fp8 = dict(data.get("fp8", {}))
    fp8_sizes = fp8.pop("model_size", {})
    if data.get("fp8") is not None:
        out.append(("fp8", fp8))
    out += [(f'fp8.model_size."{k}"', v) for k, v in fp8_sizes.items()]
    return out


def read_profile(name: str) -> dict[str, Any]:
    """The parsed TOML of one profile (for tests and tools); `load_profile` is what runs use."""
    if name not in list_profiles():
        raise ProfileError(f"no GPU profile named {name!r}; profiles: {', '.join(list_profiles())}")
    return _read(name)


def match_profile(gpu_name: str) -> str:
    """Profile name for a GPU name such as "NVIDIA H100 80GB HBM3"."""
    hits = [
        name
        for name in list_profiles()
        if any(re.search(rx, gpu_name, re.IGNORECASE) for rx in _read(name)["meta"]["match"])
    ]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise ProfileError(
            f"no GPU profile matches {gpu_name!r}; pass --gpu-profile with one of: "
            f"{', '.join(list_profiles())} (the closest in memory size), or add a file to "
            f"{PROFILE_DIR}"
        )
    raise ProfileError(f"GPU {gpu_name!r} matches several profiles ({', '.join(hits)}); pass --gpu-profile")


def size_class(model_size_b: float, classes: list[str]) -> str:
    """The smallest size class ("14b") holding at least `_SIZE_SLACK` of the model's parameters."""
    sizes = sorted((float(c[:-1]), c) for c in classes)
    for value, name in sizes:
        if value >= model_size_b * _SIZE_SLACK:
            return name
    raise ProfileError(
        f"no size class for a {model_size_b:g}B model (largest: {sizes[-1][1]}); pass "
        "overrides such as tp_size and max_running_requests, or add a model_size table"
    )


def load_profile(
    name_or_gpu: str | None = None,
    *,
    model_size_b: float | None = None,
    fp8: bool = False,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Server args for `sglang.Engine(model_path=..., **args)` or `sglang.launch_server` flags.

    `name_or_gpu`: a profile name (see list_profiles()), a GPU name, or None to detect the GPU.
    `model_size_b`: parameters in billions (see estimate_model_size_b); None = the 8b defaults.
    `fp8`: add the profile's [fp8] tables (an error on GPUs without FP8)."""
    if name_or_gpu is None:
        from engine.backends.select import detect_gpu

        name_or_gpu = detect_gpu()
        if name_or_gpu is None:
            raise ProfileError(
                "no GPU found (nvidia-smi lists none) to pick a profile for; pass "
                f"--gpu-profile with one of: {', '.join(list_profiles())}"
            )
    name = name_or_gpu if name_or_gpu in list_profiles() else match_profile(name_or_gpu)
    data = _read(name)
    path = PROFILE_DIR / f"{name}.toml"
    args: dict[str, Any] = dict(data.get("server_args", {}))
    size = size_class(model_size_b, list(data.get("model_size", {}))) if model_size_b is not None else None
    if size is not None:
        args.update(data["model_size"][size])
    if fp8:
        if "fp8" not in data:
            raise ProfileError(
                f"{path}: {name} has no FP8 settings ({data['meta'].get('description', '')}); drop --fp8"
            )
        fp8_table = dict(data["fp8"])
        fp8_sizes = fp8_table.pop("model_size", {})
        args.update(fp8_table)
        if size is not None and size in fp8_sizes:
            args.update(fp8_sizes[size])
    validate_server_args(args, source=str(path))
    validate_server_args(overrides or {}, source="overrides")
    args.update(overrides or {})
    return args


def validate_server_args(args: dict[str, Any], *, source: str = "server args") -> None:
    """Raise ProfileError on a key that is not a ServerArgs field of the installed SGLang, or a
    value outside its fixed choices. Without SGLang installed there is nothing to check against."""
    from kernels_cfg.fields import server_arg_fields

    try:
        fields = server_arg_fields()
    except LookupError:
        return
    unknown = sorted(k for k in args if k not in fields)
    if unknown:
        raise ProfileError(
            f"{source}: unknown SGLang server argument(s) {unknown}; names must be "
            "ServerArgs fields of the installed sglang (see sglang/srt/arg_groups/fields/)"
        )
    for key, value in args.items():
        choices = fields[key].choices
        if choices is not None and value is not None and value not in choices:
            raise ProfileError(f"{source}: {key} = {value!r} is not one of {list(choices)}")


def to_cli_flags(args: dict[str, Any]) -> list[str]:
    """The same settings as `python -m sglang.launch_server` flags (exact flag names from SGLang's
    source when it is installed; else the field name with dashes, SGLang's default spelling)."""
    from kernels_cfg.fields import server_arg_fields

    try:
        fields = server_arg_fields()
    except LookupError:
        fields = {}
    flags: list[str] = []
    for key, value in args.items():
        flag = fields[key].cli_flag if key in fields else "--" + key.replace("_", "-")
        if isinstance(value, bool):
            if value:
                flags.append(flag)
            continue
        flags += [flag, value if isinstance(value, str) else orjson.dumps(value).decode()]
    return flags


def estimate_model_size_b(model_path: str | Path) -> float | None:
    """Parameters in billions of a local Hugging Face checkpoint, from its safetensors index
    (total bytes / bytes per parameter of its dtype), or None when that cannot be told."""
    root = Path(model_path)
    index = root / "model.safetensors.index.json"
    total = None
    if index.is_file():
        total = orjson.loads(index.read_bytes()).get("metadata", {}).get("total_size")
    if total is None:
        files = list(root.glob("*.safetensors"))
        total = sum(f.stat().st_size for f in files) if files else None
    if not total:
        return None
    dtype = "bfloat16"
    config = root / "config.json"
    if config.is_file():
        cfg = orjson.loads(config.read_bytes())
        dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or dtype)
    per_param = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1}.get(dtype, 2)
    return total / per_param / 1e9
