"""kernels_cfg: every key of every profile is a ServerArgs field of the pinned SGLang (read from its
source with ast), values sit within SGLang's fixed choices, the memory arithmetic holds, and the
loader picks, merges and rejects as documented."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

import kernels_cfg
from kernels_cfg import ProfileError, list_profiles, load_profile, read_profile, server_arg_tables, tomllib
from kernels_cfg.fields import server_arg_fields, sglang_root, sglang_version

REPO = Path(__file__).resolve().parents[1]
GiB = 1024**3


def pinned_sglang() -> str:
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["sglang"]
    for req in extra:
        m = re.match(r"sglang(\[[^\]]*\])?==([\w.]+)", req)
        if m:
            return m.group(2)
    raise AssertionError(f"pyproject.toml [sglang] extra pins no sglang version: {extra}")


@pytest.fixture(scope="module")
def fields():
    pin = pinned_sglang()
    root = sglang_root()
    if root is None:
        pytest.skip(f"sglang source not installed: pip install --no-deps sglang=={pin} (the Makefile does)")
    installed = sglang_version(root)
    assert installed == pin, (
        f"installed sglang {installed} but pyproject pins {pin}: pip install --no-deps sglang=={pin}"
    )
    return server_arg_fields(root)


def test_reader_finds_the_fields_we_rely_on(fields):
    for name in (
        "mem_fraction_static",
        "max_running_requests",
        "chunked_prefill_size",
        "attention_backend",
        "schedule_policy",
        "grammar_backend",
        "tp_size",
        "quantization",
        "kv_cache_dtype",
        "log_level",
    ):
        assert name in fields, f"ServerArgs has no {name} in the pinned sglang"
    assert "fa3" in fields["attention_backend"].choices and "lpm" in fields["schedule_policy"].choices
    assert fields["enable_mixed_chunk"].is_bool


@pytest.mark.parametrize("name", list_profiles())
def test_every_profile_key_is_a_pinned_server_arg(name, fields):
    for table, args in server_arg_tables(read_profile(name)):
        where = f"kernels_cfg/{name}.toml [{table}]"
        unknown = sorted(set(args) - set(fields))
        assert not unknown, f"{where}: not ServerArgs fields of the pinned sglang: {unknown}"
        for key, value in args.items():
            f = fields[key]
            if f.choices is not None:
                assert value in f.choices, f"{where}: {key} = {value!r} not in {f.choices}"
            if f.is_bool:
                assert isinstance(value, bool), f"{where}: {key} must be true/false"


# Model classes as the profiles' comments state them: (parameters, KV bytes per token, bf16).
MODELS = {
    "8b": (8.03e9, 128 * 1024),
    "14b": (14.8e9, 200 * 1024),
    "32b": (32.8e9, 256 * 1024),
    "70b": (70.6e9, 320 * 1024),
}


@pytest.mark.parametrize("name", list_profiles())
@pytest.mark.parametrize("fp8", [False, True])
def test_memory_arithmetic_leaves_kv_room_for_every_running_request(name, fp8):
    """Static memory minus weights must hold >= 1k KV tokens per running request (a request holds
    ~1.5k unique tokens once the template is cached; SGLang queues when the pool runs short)."""
    data = read_profile(name)
    if fp8 and "fp8" not in data:
        with pytest.raises(ProfileError, match="no FP8"):
            load_profile(name, fp8=True)
        return
    mem = data["meta"]["memory_mib"] * 1024**2
    for size, (params, kv_bytes) in MODELS.items():
        args = load_profile(name, model_size_b=float(size[:-1]), fp8=fp8)
        tp = args.get("tp_size", 1)
        scale = 0.5 if fp8 else 1.0
        weights = params * 2 * scale / tp
        kv_pool = args["mem_fraction_static"] * mem - weights
        tokens = kv_pool / (kv_bytes * scale / tp)
        per_request = tokens / args["max_running_requests"]
        assert per_request >= 1000, f"{name} {size} fp8={fp8}: {per_request:.0f} KV tokens per request"
        assert args["cuda_graph_max_bs_decode"] >= args["max_running_requests"], f"{name} {size}"
        assert 0.5 < args["mem_fraction_static"] < 0.95


@pytest.mark.parametrize(
    "gpu,profile",
    [
        ("NVIDIA H100 80GB HBM3", "h100-80gb"),
        ("NVIDIA H100 PCIe", "h100-80gb"),
        ("NVIDIA H200", "h200-141gb"),
        ("NVIDIA A100-SXM4-80GB", "a100-80gb"),
        ("NVIDIA A100 80GB PCIe", "a100-80gb"),
        ("NVIDIA A100-PCIE-40GB", "a100-40gb"),
    ],
)
def test_gpu_names_pick_their_profile(gpu, profile):
    assert kernels_cfg.match_profile(gpu) == profile
    assert load_profile(gpu) == load_profile(profile)


def test_unknown_gpu_lists_the_profiles():
    with pytest.raises(ProfileError) as e:
        load_profile("NVIDIA GH200 480GB")
    assert all(p in str(e.value) for p in list_profiles()) and "--gpu-profile" in str(e.value)


def test_hopper_profiles_use_fa3_and_ampere_flashinfer():
    assert load_profile("h100-80gb")["attention_backend"] == "fa3"
    assert load_profile("h200-141gb")["attention_backend"] == "fa3"
    assert load_profile("a100-80gb")["attention_backend"] == "flashinfer"
    assert load_profile("a100-40gb")["attention_backend"] == "flashinfer"


def test_merge_order_base_size_fp8_then_overrides():
    base = load_profile("h100-80gb")
    big = load_profile("h100-80gb", model_size_b=70.6)
    big_fp8 = load_profile("h100-80gb", model_size_b=70.6, fp8=True, overrides={"max_running_requests": 7})
    assert base.get("tp_size", 1) == 1 and big["tp_size"] == 4
    assert big_fp8["tp_size"] == 2 and big_fp8["quantization"] == "fp8"
    assert big_fp8["max_running_requests"] == 7
    # A 9B or 10.7B model gets the 14b class (conservative), an 8.03B one the 8b class.
    assert (
        load_profile("h100-80gb", model_size_b=10.7)["max_running_requests"]
        == load_profile("h100-80gb", model_size_b=14)["max_running_requests"]
    )
    assert load_profile("h100-80gb", model_size_b=8.03) == base


def test_unknown_override_key_is_an_error_not_dropped(fields):
    with pytest.raises(ProfileError, match="max_runing_requests"):
        load_profile("h100-80gb", overrides={"max_runing_requests": 3})


def test_unknown_key_in_a_profile_file_is_an_error(tmp_path, monkeypatch, fields):
    for p in kernels_cfg.PROFILE_DIR.glob("*.toml"):
        shutil.copy(p, tmp_path / p.name)
    bad = tmp_path / "h100-80gb.toml"
    bad.write_text(bad.read_text().replace("[server_args]\n", "[server_args]\ncuda_graph_max_bs = 256\n"))
    monkeypatch.setattr(kernels_cfg, "PROFILE_DIR", tmp_path)
    with pytest.raises(ProfileError, match="cuda_graph_max_bs"):
        load_profile("h100-80gb")


def test_cli_flags_use_sglang_spelling(fields):
    flags = kernels_cfg.to_cli_flags(load_profile("h100-80gb", fp8=True))
    assert "--mem-fraction-static" in flags and "--enable-mixed-chunk" in flags
    assert flags[flags.index("--kv-cache-dtype") + 1] == "fp8_e4m3"


def test_field_reader_on_a_synthetic_source_tree(tmp_path):
    """The ast reader on both layouts it knows, without any real SGLang."""
    root = tmp_path / "sglang"
    (root / "srt" / "arg_groups" / "fields").mkdir(parents=True)
    (root / "_version.py").write_text("__version__ = version = '9.9.9'\n")
    (root / "srt" / "arg_groups" / "choices.py").write_text("POLICIES = ['lpm', 'fcfs']\n")
    (root / "srt" / "arg_groups" / "fields" / "sched.py").write_text(
        "from typing import ClassVar\nclass Sched:\n    _NS_PATH = 'x'\n    hidden: ClassVar[int] = 1\n"
        "    policy: A[str, Arg(help='p', choices=POLICIES)] = 'fcfs'\n"
        "    fast: A[bool, 'go fast'] = False\n"
        "    gemm: A[str, Arg(cli_name='--gemm-backend', choices=['a', 'b'])] = 'a'\n"
    )
    (root / "srt" / "server_args.py").write_text(
        "from sglang.srt.arg_groups.fields.sched import (Sched,)\n"
        "class ServerArgs:\n    def f(self): pass\n_INPUT_NAMESPACES = [Sched]\n"
    )
    got = server_arg_fields.__wrapped__(root)
    assert set(got) == {"policy", "fast", "gemm"}
    assert got["policy"].choices == ("lpm", "fcfs") and got["fast"].is_bool
    assert got["gemm"].cli_flag == "--gemm-backend"
    assert sglang_version(root) == "9.9.9"
    # Older layout: one dataclass holding every field.
    (root / "srt" / "server_args.py").write_text(
        "class ServerArgs:\n    model_path: str\n    tp_size: int = 1\n"
    )
    assert set(server_arg_fields.__wrapped__(root)) == {"model_path", "tp_size"}


def test_estimate_model_size_from_safetensors_index(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {"total_size": 16060522496}}')
    (tmp_path / "config.json").write_text('{"torch_dtype": "bfloat16"}')
    assert kernels_cfg.estimate_model_size_b(tmp_path) == pytest.approx(8.03, abs=0.01)
    assert kernels_cfg.estimate_model_size_b(tmp_path / "missing") is None
