"""Errors the session raises on bad input or a budget the device cannot hold."""


class InvalidFrameError(ValueError):
    """A frame the session will not encode (wrong type, shape, dtype or values). The session is unchanged."""


class InvalidInstructionError(ValueError):
    """An instruction the session will not prefill (not a string, empty, or no room at all). Session unchanged."""


class InsufficientMemoryError(MemoryError):
    """Weights + KV budget do not fit the device; raised at start-up, before anything is allocated."""


class CacheFullError(RuntimeError):
    """A non-evicting cache (policy "full") has no room for the next chunk + answer; nothing was fed. reset() or
    use an evicting policy / a larger budget."""


class SnapshotError(RuntimeError):
    """A session snapshot could not be saved or restored. On restore the session is left reset (a fresh start)."""


class SnapshotCorruptError(SnapshotError):
    """The snapshot file is missing, truncated, damaged (checksum) or not a snapshot."""


class SnapshotMismatchError(SnapshotError):
    """The snapshot was written by another model, cache config, dtype or format version."""
