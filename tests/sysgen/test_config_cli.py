import pytest

from sysgen.cli import build_parser, main
from sysgen.config import RunConfig


def test_every_config_field_is_a_flag():
    args = build_parser().parse_args(
        [
            "run",
            "a.jsonl",
            "b.jsonl",
            "--out",
            "o",
            "--limit",
            "3",
            "--no-constrain",
            "--shard",
            "1/4",
            "--p4-max-tokens",
            "64",
            "--engine",
            "hf",
        ]
    )
    assert args.inputs == ["a.jsonl", "b.jsonl"] and args.limit == 3 and args.constrain is False
    assert args.shard == "1/4" and args.p4_max_tokens == 64 and args.engine == "hf"


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"inputs": ()}, "no input files"),
        ({"engine": "vllm"}, "unknown"),
        ({"engine": "sglang_http"}, "needs --url"),
        ({"engine": "hf", "openai_server": "vllm"}, "--openai-server applies to --engine openai only"),
        ({"shard": "3/2"}, "0 <= i < N"),
        ({"shard": "x"}, "expected i/N"),
        ({"limit": -1}, "--limit"),
        ({"p1_max_tokens": 0}, "--p1-max-tokens"),
    ],
)
def test_config_errors_say_what_to_fix(kw, msg):
    base = {"inputs": ("a.jsonl",), "out": "o"}
    with pytest.raises(ValueError, match=msg):
        RunConfig(**{**base, **kw})


def test_config_is_frozen():
    cfg = RunConfig(inputs=("a.jsonl",), out="o", shard="1/4")
    assert cfg.shard_spec == (1, 4)
    with pytest.raises(AttributeError):
        cfg.limit = 3  # type: ignore[misc]


def test_missing_input_is_reported_before_any_model_loads(tmp_path, capsys):
    rc = main(["run", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "nope.jsonl: no such file or folder" in capsys.readouterr().err


def test_a_model_path_that_is_not_a_model_is_a_clean_error(tmp_path, capsys):
    (tmp_path / "in.jsonl").write_text('{"instruction": "q", "output": "a"}\n')
    rc = main(
        [
            "run",
            str(tmp_path / "in.jsonl"),
            "--out",
            str(tmp_path / "o"),
            "--engine",
            "hf",
            "--model",
            str(tmp_path / "not-a-model"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert "not-a-model" in err and "fix: pass a .gguf file or an OpenVINO model folder" in err
    assert "Traceback" not in err


def test_api_key_from_the_environment(monkeypatch):
    from sysgen.cli import env_api_key

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    assert env_api_key("vllm_http") is None
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai")
    assert env_api_key("vllm_http") == env_api_key("openai") == env_api_key("sglang_http") == "sk-openai"
    monkeypatch.setenv("VLLM_API_KEY", "vllm-key")  # what `vllm serve` reads: the vLLM client takes it first
    assert env_api_key("vllm_http") == "vllm-key"
    assert env_api_key("openai") == env_api_key("sglang_http") == "sk-openai"
