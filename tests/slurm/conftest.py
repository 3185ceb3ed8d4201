"""The `slurm` fixture: one real single-node Slurm cluster for the module, stopped afterwards; the
tests skip naming exactly why where one cannot start (see cluster.unavailable)."""

from __future__ import annotations

import pytest

from tests.slurm.cluster import Cluster, unavailable


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    why = unavailable()
    if why:
        pytest.skip(f"no real Slurm here: {why}")
    # MaxArraySize 5: an 8-shard run is split into two arrays, as a larger run on a real cluster is.
    cluster = Cluster(tmp_path_factory.mktemp("slurm"), cpus=4, max_array_size=5)
    try:
        cluster.start()
    except (RuntimeError, OSError) as e:
        cluster.stop()
        pytest.skip(f"a single-node Slurm did not start on this machine: {e}")
    yield cluster
    cluster.stop()
