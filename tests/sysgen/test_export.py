"""Export formats load with `datasets` as they are; the dataset card's front matter is valid."""

from __future__ import annotations

import pytest
import yaml

try:
    from tests.sysgen.eval_fixtures import RECORDS, build_run
except ImportError:  # tests/sysgen is not a package: pytest put its folder on sys.path
    from eval_fixtures import RECORDS, build_run

from sysgen.eval.rundir import load_run
from sysgen.publish.card import UNKNOWN, source_license, write_card
from sysgen.publish.export import export


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hf-cache"


def _load(kind: str, path, cache):
    import datasets

    return datasets.load_dataset(kind, data_files=str(path), split="train", cache_dir=str(cache))


def test_messages_jsonl_loads(tmp_path, offline):
    run = load_run(build_run(tmp_path / "run"))
    path, n = export(run, "messages")
    assert path == run.path / "export" / "messages.jsonl" and n == len(RECORDS)
    ds = _load("json", path, offline)
    assert ds.num_rows == len(RECORDS)
    assert ds[0]["messages"] == [{"role": m["role"], "content": m["content"]} for m in RECORDS[0]["messages"]]
    assert ds[2]["id"] == "gsm_prompts:1" and ds[2]["source"] == "gsm_prompts"


def test_sharegpt_jsonl_loads(tmp_path, offline):
    run = load_run(build_run(tmp_path / "run"))
    path, _ = export(run, "sharegpt", tmp_path / "sg")
    assert path == tmp_path / "sg" / "sharegpt.jsonl"
    ds = _load("json", path, offline)
    conv = ds[1]["conversations"]
    assert [c["from"] for c in conv] == ["system", "human", "gpt"]
    assert conv[2]["value"] == RECORDS[1]["messages"][2]["content"]


def test_parquet_loads_with_struct_messages(tmp_path, offline):
    import pyarrow.parquet as pq

    run = load_run(build_run(tmp_path / "run"))
    path, _ = export(run, "parquet")
    schema = pq.read_schema(path)
    assert str(schema.field("messages").type) == "list<element: struct<role: string, content: string>>"
    ds = _load("parquet", path, offline)
    assert ds.column_names == ["id", "source", "messages"]
    assert ds[0]["messages"][1] == {"role": "user", "content": RECORDS[0]["messages"][1]["content"]}


def test_unknown_role_names_record(tmp_path):
    bad = {**RECORDS[0], "messages": [{"role": "tool", "content": "x"}]}
    run = load_run(build_run(tmp_path / "run", records=[bad]))
    with pytest.raises(ValueError, match=r"record 1 \(id 'capybara_test:1'\): unknown role 'tool'"):
        export(run, "messages")
    assert not list((run.path / "export").iterdir())  # no half-written file left behind


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n", 2)[1])


def test_card_front_matter_configs_and_licences(tmp_path):
    run = load_run(build_run(tmp_path / "run"))
    export(run, "messages")
    export(run, "sharegpt")
    text = write_card(run, folder=run.path / "export").read_text()
    meta = _front_matter(text)
    # capybara is MIT; gsm_prompts is matched as GSM8K by its file name: MIT too.
    assert meta["license"] == "mit"
    assert meta["task_categories"] == ["text-generation"]
    paths = {c["config_name"]: c["data_files"][0]["path"] for c in meta["configs"]}
    assert paths == {"messages": "messages.jsonl", "sharegpt": "sharegpt.jsonl"}
    assert all((run.path / "export" / p).is_file() for p in paths.values())
    assert "p1 `aaaa`" in text and "| all | 7 (100.0%)" in text and "| Role | 2 / 2" in text


def test_card_unknown_licence_and_override(tmp_path):
    stats = {"sources": {"mystery": {"path": "x/mystery.jsonl", "fmt": "alpaca"}}}
    rec = {**RECORDS[0], "source": "mystery"}
    run = load_run(build_run(tmp_path / "run", records=[rec], dropped=[], stats=stats))
    text = write_card(run).read_text()
    assert _front_matter(text)["license"] == "other" and UNKNOWN in text
    assert _front_matter(write_card(run, license="cc-by-4.0").read_text())["license"] == "cc-by-4.0"


def test_source_licence_map():
    assert source_license("meta_math_qa_test") == ("meta-math/MetaMathQA", "mit")
    assert source_license("slim_orca_dedup_test")[1] == "mit"
    assert source_license("magicoder_oss_instruct_first500")[1] == "mit"
    assert source_license("stuff", "data/gsm8k_test_first300.jsonl")[1] == "mit"
    assert source_license("airoboros") == ("", UNKNOWN)
    from sysgen.publish.card import SAMPLES_DIR

    assert source_license("demo_mixed", str(SAMPLES_DIR / "demo_mixed.jsonl"))[1] == "apache-2.0"
    assert source_license("demo_mixed", "/elsewhere/demo_mixed.jsonl") == ("", UNKNOWN)


def test_parquet_written_in_row_groups(tmp_path, monkeypatch, offline):
    import pyarrow.parquet as pq

    from sysgen.publish import export as export_mod

    monkeypatch.setattr(export_mod, "PARQUET_BATCH", 2)
    run = load_run(build_run(tmp_path / "run"))
    path, n = export(run, "parquet")
    assert n == 3 and pq.ParquetFile(path).num_row_groups == 2
    assert _load("parquet", path, offline)["id"] == [r["id"] for r in RECORDS]


def _export_cli(*args: str) -> int:
    from sysgen.cli import main

    return main(["export", *args])


def test_export_folder_loads_with_its_card(tmp_path, offline):
    import datasets

    run_dir = build_run(tmp_path / "run")
    dest = tmp_path / "release"
    assert _export_cli(str(run_dir), "--out", str(dest)) == 0
    assert _export_cli(str(run_dir), "--out", str(dest), "--format", "sharegpt") == 0
    assert sorted(p.name for p in dest.iterdir()) == ["README.md", "messages.jsonl", "sharegpt.jsonl"]
    assert not (run_dir / "README.md").exists()  # nothing written into the run
    meta = _front_matter((dest / "README.md").read_text())
    assert {c["config_name"]: c["data_files"][0]["path"] for c in meta["configs"]} == {
        "messages": "messages.jsonl",
        "sharegpt": "sharegpt.jsonl",
    }
    ds = datasets.load_dataset(str(dest), split="train", cache_dir=str(offline))
    assert ds.num_rows == len(RECORDS) and ds[0]["messages"][2]["role"] == "assistant"
    sg = datasets.load_dataset(str(dest), "sharegpt", split="train", cache_dir=str(offline))
    assert sg[0]["conversations"][1]["from"] == "human"
    # parquet goes to a folder of its own: datasets reads one file type per folder
    assert _export_cli(str(run_dir), "--out", str(dest), "--format", "parquet") == 2
    assert _export_cli(str(run_dir), "--out", str(tmp_path / "pq"), "--format", "parquet") == 0
    pq = datasets.load_dataset(str(tmp_path / "pq"), split="train", cache_dir=str(offline))
    assert pq["id"] == [r["id"] for r in RECORDS]


def test_export_never_writes_over_the_run(tmp_path, capsys):
    run_dir = build_run(tmp_path / "run")
    before = (run_dir / "data.jsonl").read_bytes()
    assert _export_cli(str(run_dir), "--out", str(run_dir / "data.jsonl")) == 2
    assert "is a file; the export is a folder" in capsys.readouterr().err
    assert _export_cli(str(run_dir), "--out", str(run_dir)) == 2
    assert "is the run folder itself" in capsys.readouterr().err
    assert _export_cli(str(run_dir), "--out", str(tmp_path / "x.jsonl")) == 2
    assert (run_dir / "data.jsonl").read_bytes() == before and not (tmp_path / "x.jsonl").exists()
    other = tmp_path / "repo"
    other.mkdir()
    (other / "README.md").write_text("# my project\n")
    assert _export_cli(str(run_dir), "--out", str(other)) == 2
    assert "is not a sysgen dataset card" in capsys.readouterr().err
    assert (other / "README.md").read_text() == "# my project\n"


def test_export_from_a_read_only_run_folder(tmp_path, capsys, monkeypatch):
    import errno
    from pathlib import Path

    run_dir = build_run(tmp_path / "run")
    real_mkdir = Path.mkdir

    def read_only(self, *a, **kw):  # a read-only mount, also for root (who may write through chmod)
        if self.is_relative_to(run_dir):
            raise PermissionError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *a, **kw)

    monkeypatch.setattr(Path, "mkdir", read_only)
    assert _export_cli(str(run_dir)) == 2
    err = capsys.readouterr().err
    assert "cannot write" in err and "Read-only file system" in err and "pass --out to a writable" in err
    assert _export_cli(str(run_dir), "--out", str(tmp_path / "elsewhere")) == 0
    assert (tmp_path / "elsewhere" / "README.md").is_file() and not (run_dir / "README.md").exists()


def test_export_of_an_unfinished_run_says_so(tmp_path, capsys):
    run_dir = build_run(tmp_path / "run", stats={"kept": len(RECORDS) - 1})
    assert _export_cli(str(run_dir), "--out", str(tmp_path / "e")) == 0
    err = capsys.readouterr().err
    assert f"unfinished: data.jsonl holds {len(RECORDS)} records but stats.json" in err
    assert "**unfinished run**" in (tmp_path / "e" / "README.md").read_text()
    assert _export_cli(str(build_run(tmp_path / "nostats", stats=None)), "--out", str(tmp_path / "f")) == 0
    assert "has no stats.json" in capsys.readouterr().err
    finished = build_run(tmp_path / "done", stats={"kept": len(RECORDS)})
    assert _export_cli(str(finished), "--out", str(tmp_path / "g")) == 0
    assert "unfinished" not in capsys.readouterr().err
