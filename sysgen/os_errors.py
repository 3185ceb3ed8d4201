"""An OSError as the one line a user sees: the path, what went wrong, and what to do about it."""

from __future__ import annotations

import errno

_FIX = {
    errno.ENOSPC: "free space on that disk (or write to another one), then run the command again",
    errno.EDQUOT: "free space within your disk quota (or write elsewhere), then run the command again",
    errno.EACCES: "give this user access to it (chmod/chown), or use another path",
    errno.EPERM: "give this user access to it (chmod/chown), or use another path",
    errno.EROFS: "that file system is read-only: use a path on a writable one",
    errno.ENOENT: "check that the path exists",
    errno.EISDIR: "a folder stands where a file is expected: check the path",
    errno.ENOTDIR: "a file stands where a folder is expected: check the path",
    errno.EIO: "the disk reported an I/O error: check it (dmesg), then run the command again",
}


def os_error_line(e: OSError) -> str:
    """'PATH: reason. Fix: ...' for any OSError (the path where the error names one)."""
    where = e.filename if e.filename is not None else "a file"
    if e.filename2 is not None:
        where = f"{e.filename} -> {e.filename2}"
    reason = e.strerror or str(e) or type(e).__name__
    fix = _FIX.get(e.errno, "check the path, its permissions and the disk, then run the command again")
    return f"{where}: {reason}. Fix: {fix}"
