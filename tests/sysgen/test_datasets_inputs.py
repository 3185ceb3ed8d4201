"""Inputs as users have them: folders, glob patterns, same-name files, CSV/TSV, parquet shard
folders, Hugging Face save_to_disk folders and hf:NAME from a local cache, all built here."""

from __future__ import annotations

import os

import orjson
import pytest

from sysgen.datasets import DatasetError, Instance, Rejected, iter_instances, preflight, resolve_inputs
from sysgen.datasets.inputs import _names


def jsonl(path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))


def qa(n: int, tag: str = "") -> list[dict]:
    return [{"question": f"{tag}q{i}", "answer": f"{tag}a{i}"} for i in range(1, n + 1)]


def parquet_shards(folder, n_shards: int, rows_each: int) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for s in range(n_shards):
        part = [{"prompt": f"shard{s} row{i}", "response": f"r{s}.{i}"} for i in range(rows_each)]
        pq.write_table(pa.Table.from_pylist(part), folder / f"train-{s:05d}-of-{n_shards:05d}.parquet")
        rows += part
    return rows


def test_same_file_name_in_two_folders_gets_distinct_readable_names(tmp_path):
    a, b = tmp_path / "mt_bench" / "question.jsonl", tmp_path / "vicuna_bench" / "question.jsonl"
    jsonl(a, qa(2, "mt"))
    jsonl(b, qa(3, "vi"))
    items = list(iter_instances([a, b]))
    assert [i.id for i in items] == [
        "mt_bench/question:1",
        "mt_bench/question:2",
        "vicuna_bench/question:1",
        "vicuna_bench/question:2",
        "vicuna_bench/question:3",
    ]
    # a name that is unique stays short
    assert [s.name for s in resolve_inputs([a, tmp_path / "vicuna_bench"])] == [
        "mt_bench/question",
        "vicuna_bench/question",
    ]
    assert [s.name for s in resolve_inputs([a])] == ["question"]


def test_names_are_shortest_suffix_and_earlier_names_stay():
    paths = ["/d/x/a/train.jsonl", "/d/y/a/train.jsonl", "/d/z/test.jsonl", "/d/z/train.parquet"]
    assert _names(paths, {}) == ["x/a/train", "y/a/train", "test", "z/train"]
    # same path but the extension: the extension tells them apart
    assert _names(["/d/a/train.jsonl", "/d/a/train.parquet"], {}) == ["train.jsonl", "train.parquet"]
    # a second folder added later does not rename the first run's source (its done markers hold)
    assert _names(["/d/x/train.jsonl", "/d/y/train.jsonl"], {"/d/x/train.jsonl": "train"}) == [
        "train",
        "y/train",
    ]


def test_folder_reads_every_data_file_in_natural_order_and_skips_the_rest(tmp_path, caplog):
    d = tmp_path / "data"
    jsonl(d / "part2.jsonl", qa(1, "p2"))
    jsonl(d / "part10.jsonl", qa(1, "p10"))
    jsonl(d / "sub" / "extra.jsonl", qa(1, "sub"))
    jsonl(d / ".hidden" / "x.jsonl", qa(1, "hidden"))
    (d / "README.md").write_text("# notes")
    (d / "dataset_info.json").write_text("{}")
    with caplog.at_level("INFO"):
        items = list(iter_instances([d]))
    assert [i.first_user for i in items] == ["p2q1", "p10q1", "subq1"]
    assert "skipped 1 file(s) that are not data (README.md)" in caplog.text


def test_parquet_shard_folder_is_read_in_shard_order(tmp_path):
    rows = parquet_shards(tmp_path / "hub" / "data", 3, 4)
    items = list(iter_instances([tmp_path / "hub"]))
    assert [i.first_user for i in items] == [r["prompt"] for r in rows]
    assert [i.original_answer for i in items] == [r["response"] for r in rows]
    assert items[4].id == "train-00001-of-00003:1" and items[4].fmt == "prompt_response"


def test_glob_patterns_are_expanded_by_us(tmp_path):
    jsonl(tmp_path / "a" / "x.jsonl", qa(1, "ax"))
    jsonl(tmp_path / "b" / "x.jsonl", qa(1, "bx"))
    jsonl(tmp_path / "b" / "y.json", qa(1, "by"))
    items = list(iter_instances([str(tmp_path / "*" / "x.jsonl")]))
    assert [i.source for i in items] == ["a/x", "b/x"]
    assert len(list(iter_instances([str(tmp_path / "**" / "*.json*")]))) == 3
    with pytest.raises(DatasetError, match=r"the pattern matches no file") as e:
        iter_instances([str(tmp_path / "*.parquet")])
    assert e.value.kind == "argument"


def test_a_file_reached_twice_is_read_once(tmp_path):
    jsonl(tmp_path / "d" / "a.jsonl", qa(2))
    items = list(iter_instances([tmp_path / "d", tmp_path / "d" / "a.jsonl", str(tmp_path / "d" / "*")]))
    assert len(items) == 2


def test_symlink_loop_and_dangling_link_say_what_they_are(tmp_path):
    loop = tmp_path / "loop.jsonl"
    os.symlink(loop, loop)
    with pytest.raises(DatasetError, match=r"loop\.jsonl: a symbolic link loop"):
        iter_instances([loop])
    dangling = tmp_path / "gone.jsonl"
    os.symlink(tmp_path / "nowhere.jsonl", dangling)
    with pytest.raises(DatasetError, match=r"gone\.jsonl: a symbolic link to .*nowhere\.jsonl, which does"):
        iter_instances([dangling])


def test_link_name_is_the_source_name(tmp_path):
    # A Hugging Face cache is links named train.jsonl pointing at blobs named by hash.
    jsonl(tmp_path / "blobs" / "9f86d081884c7d65", qa(1))
    (tmp_path / "snap").mkdir()
    os.symlink(tmp_path / "blobs" / "9f86d081884c7d65", tmp_path / "snap" / "train.jsonl")
    assert [i.source for i in iter_instances([tmp_path / "snap"])] == ["train"]


def test_csv_and_tsv(tmp_path):
    (tmp_path / "t.csv").write_text(
        'prompt,response\n"Hello, there",hi\n"multi\nline",\n\nlast,x\n', encoding="utf-8"
    )
    items = list(iter_instances([tmp_path / "t.csv"]))
    assert [i.first_user for i in items] == ["Hello, there", "multi\nline", "last"]
    assert [i.original_answer for i in items] == ["hi", None, "x"]  # an empty cell: prompt-only
    assert [i.line for i in items] == [1, 2, 4]
    (tmp_path / "t.tsv").write_text("question\tanswer\tcategory\nq1\ta1\tmath\nq2\n", encoding="utf-8")
    items = list(iter_instances([tmp_path / "t.tsv"]))
    assert items[0].first_user == "q1" and isinstance(items[1], Rejected)
    assert "1 cells under a header of 3" in items[1].reason
    # resume by record number
    assert [
        i.line for i in iter_instances([tmp_path / "t.csv"], start={str(tmp_path / "t.csv"): (2, -1)})
    ] == [2, 4]


def test_zero_byte_parquet_is_a_bad_file_and_reading_goes_on(tmp_path):
    (tmp_path / "empty.parquet").write_bytes(b"")
    jsonl(tmp_path / "z.jsonl", qa(1))
    items = list(iter_instances([tmp_path / "empty.parquet", tmp_path / "z.jsonl"]))
    assert isinstance(items[0], Rejected) and items[0].scope == "file" and items[0].source == "empty"
    assert "not a readable parquet file" in items[0].reason
    assert isinstance(items[1], Instance)


def save_to_disk(path, rows_by_split: dict[str, list[dict]]):
    import datasets

    if list(rows_by_split) == [""]:
        datasets.Dataset.from_list(rows_by_split[""]).save_to_disk(str(path))
    else:
        datasets.DatasetDict(
            {k: datasets.Dataset.from_list(v) for k, v in rows_by_split.items()}
        ).save_to_disk(str(path))


def test_save_to_disk_dataset(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": f"u{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(2500)
    ]  # more than one slice
    save_to_disk(tmp_path / "saved", {"": rows})
    srcs = resolve_inputs([tmp_path / "saved"])
    assert [(s.name, s.kind) for s in srcs] == [("saved", "hf_disk")]
    items = list(iter_instances([tmp_path / "saved"]))
    assert [i.first_user for i in items] == [f"u{i}" for i in range(2500)]
    assert items[-1].id == "saved:2500"
    resumed = list(iter_instances([tmp_path / "saved"], start={str(tmp_path / "saved"): (2400, -1)}))
    assert resumed[0].line == 2400 and len(resumed) == 101


def test_save_to_disk_dataset_dict_needs_a_split_when_it_has_several(tmp_path):
    save_to_disk(tmp_path / "dd", {"train": qa(3, "tr"), "test": qa(1, "te")})
    with pytest.raises(DatasetError, match=r"has the splits train, test. Fix: choose one with --split"):
        preflight([tmp_path / "dd"])
    items = list(iter_instances([tmp_path / "dd"], split="test"))
    assert [i.first_user for i in items] == ["teq1"]
    with pytest.raises(DatasetError, match=r"has no split 'dev'; it has train, test"):
        preflight([tmp_path / "dd"], split="dev")
    jsonl(tmp_path / "f.jsonl", qa(1))
    with pytest.raises(DatasetError, match=r"--split applies to hf:NAME and save_to_disk inputs"):
        preflight([tmp_path / "f.jsonl"], split="train")


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A local Hugging Face hub cache holding one dataset, laid out as the hub client writes it."""
    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    repo = home / "hub" / "datasets--someone--bench"
    sha = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    rows = parquet_shards(repo / "snapshots" / sha / "data", 2, 3)
    return rows


def test_hf_name_read_from_the_local_cache_offline(hub_cache):
    preflight(["hf:someone/bench"])
    items = list(iter_instances(["hf:someone/bench"], split="train"))
    assert [i.first_user for i in items] == [r["prompt"] for r in hub_cache]
    assert items[0].id == "bench:1" and items[-1].id == "bench:6"
    resumed = list(iter_instances(["hf:someone/bench"], start={"hf:someone/bench": (5, -1)}))
    assert [i.line for i in resumed] == [5, 6]


def test_hf_name_not_cached_is_one_argument_error(hub_cache):
    with pytest.raises(DatasetError, match=r"hf:someone/elsewhere .*cannot be"):
        preflight(["hf:someone/elsewhere"])
    with pytest.raises(DatasetError, match=r"not a Hugging Face dataset name"):
        preflight(["hf:a b"])
