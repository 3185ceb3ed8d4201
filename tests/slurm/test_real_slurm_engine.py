"""A task that starts the engine it needs on its node (--engine-cmd, --engine-ready): here the HTTP
stand-in server of bench/http_server.py, as a node-sized task would start an SGLang server with
--dp-size 8, on a real single-node Slurm."""

from __future__ import annotations

import json
import socket
import sys

import pytest

from tests.slurm.cluster import _free_ports
from tests.slurm.test_real_slurm import Run
from tests.sysgen.test_http_outage_cli import tokenizer_dir  # noqa: F401  (a fixture)

pytestmark = pytest.mark.slurm  # a real single-node cluster: make test-fast leaves it out


def test_each_task_starts_its_engine_and_stops_it(slurm, tmp_path, tokenizer_dir):  # noqa: F811
    port = _free_ports(1)[0]
    url = f"http://127.0.0.1:{port}"
    engine = f"{sys.executable} -m bench.http_server --port {port} --delay 0.01"
    run = Run(slurm, tmp_path, shards=2, concurrent=1, submit=False, rows=40)
    run.sysgen(
        "slurm",
        str(run.data),
        "--out",
        str(run.dir),
        "--shards",
        "2",
        "--concurrent",
        "1",
        "--engine",
        "sglang_http",
        "--url",
        url,
        "--model",
        str(tokenizer_dir),
        "--engine-cmd",
        engine,
        "--engine-ready",
        f"{url}/get_model_info",
    )
    rec = run.finished()
    assert rec["merged"] is True, rec
    run.check_exactly_once()
    for i in range(2):
        assert "PORT" in (run.shard(i) / "engine.log").read_text()
        assert "engine: sglang_http" in (run.shard(i) / "task.log").read_text()
    with pytest.raises(ConnectionRefusedError):  # stopped with its shard: nothing listens on the port
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    assert json.loads((run.dir / "merged" / "stats.json").read_text())["input"] == 40
