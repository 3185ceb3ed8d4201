"""--deterministic: offered where an engine gives batch-invariant output (SGLang), refused with the
reason and the fix elsewhere (docs/determinism.md)."""

from __future__ import annotations

import pytest

from sysgen.backend_factory import NOT_DETERMINISTIC, make_backend


@pytest.mark.parametrize("engine", ["openvino", "vllm_http", "openai"])
def test_engines_without_batch_invariance_refuse_it_with_the_reason(engine):
    with pytest.raises(ValueError, match=f"--deterministic is not offered with --engine {engine}"):
        make_backend(engine, model="m", url="http://127.0.0.1:9", deterministic=True)
    assert "VLLM_BATCH_INVARIANT=1" in NOT_DETERMINISTIC["vllm_http"]  # the server-side switch


def test_in_process_sglang_turns_on_deterministic_inference(monkeypatch, tmp_path):
    import engine.backends.sglang as sglang_backend

    made = {}

    class Captured:
        def __init__(self, model, server_args, request_timeout_s):
            made.update(server_args)

    monkeypatch.setattr(sglang_backend, "SGLangBackend", Captured)
    make_backend("sglang", model=str(tmp_path), gpu_profile="h100-80gb", deterministic=True)
    assert made["enable_deterministic_inference"] is True
    made.clear()
    make_backend("sglang", model=str(tmp_path), gpu_profile="h100-80gb")
    assert "enable_deterministic_inference" not in made


def test_enable_deterministic_inference_is_a_pinned_sglang_server_arg():
    from kernels_cfg.fields import server_arg_fields, sglang_root

    root = sglang_root()
    if root is None:
        pytest.skip("sglang source not installed: pip install --no-deps sglang (the Makefile does)")
    assert server_arg_fields(root)["enable_deterministic_inference"].is_bool


def test_cli_refuses_deterministic_on_the_cpu_engine_with_exit_2(tmp_path, capsys):
    from pathlib import Path

    from sysgen.cli import main

    sample = Path(__file__).resolve().parents[2] / "sysgen" / "samples" / "demo_mixed.jsonl"
    code = main(
        [
            "run",
            str(sample),
            "--out",
            str(tmp_path / "out"),
            "--engine",
            "openvino",
            "--deterministic",
            "--no-progress",
            "--no-report",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "--deterministic is not offered with --engine openvino" in err
