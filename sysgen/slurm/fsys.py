"""Is a folder on a file system where the shards' SQLite stores are safe?

Each shard's store has one writer at a time (the array task; its lock file refuses a second), and
`sysgen status` never opens a store, so SQLite's WAL never needs shared memory across hosts. What it
does need is working POSIX/flock locks: local disks, NFSv4 and the parallel file systems of HPC
clusters (Lustre, GPFS, BeeGFS, CephFS) have them; SMB/CIFS and FUSE mounts such as sshfs commonly
do not, and a lock that silently succeeds can let two writers corrupt a store."""

from __future__ import annotations

import os
from pathlib import Path

UNSAFE = ("cifs", "smb3", "smbfs", "fuse.sshfs", "fuse.s3fs", "fuse.gcsfuse", "fuse.rclone", "9p")
NETWORK = ("nfs", "nfs4", "lustre", "gpfs", "beegfs", "ceph", "fuse.ceph", "glusterfs", "fuse.glusterfs")


def fs_type(path: Path, mounts: str = "/proc/self/mounts") -> str | None:
    """The type of the file system holding `path` (or its nearest existing parent), None when unknown."""
    target = os.path.realpath(path)
    while not os.path.exists(target):
        target = os.path.dirname(target)
    try:
        with open(mounts) as f:
            return mount_type(target, f.read())
    except OSError:
        return None


def mount_type(target: str, table: str) -> str | None:
    """The type of the longest mount point in `table` (/proc/mounts lines) holding `target`."""
    best, kind = "", None
    for line in table.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, parts[2]
    return kind


def store_fs_problem(path: Path) -> str | None:
    """Why shard stores must not live under `path`, or None."""
    kind = fs_type(path)
    if kind in UNSAFE:
        return (
            f"{path} is on a {kind} file system, where SQLite's locks are not reliable and two "
            "writers could corrupt a shard's store. Fix: put --out on a local disk, NFSv4, Lustre, "
            "GPFS or BeeGFS (or pass --allow-fs if you know its locks work)"
        )
    return None
