"""The store's two kinds of failure, apart from the store so that its helpers raise them too."""


class StoreError(RuntimeError):
    """The store cannot be used (schema mismatch, disk full, corrupt sink). The run stops cleanly."""


class SinkMismatch(StoreError):
    """An output file is not what the store committed (edited, cut, or store.db of another run): a
    problem the user fixes (exit 2), not a failure of the run. The message says what and how."""
