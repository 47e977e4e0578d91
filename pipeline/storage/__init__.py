"""Storage for the job, one concern per module; the names callers use are importable from here.

- `opening`: fsspec options for a URI, `open_fs`, the `Storage` value (endpoint + options), what kind
  of filesystem a path lives on.
- `atomic`: writes a reader sees whole or not at all, and the hidden temporaries a kill leaves.
- `retries`: transient or permanent, `with_retries` and its backoff. Its tunables (STORAGE_ATTEMPTS,
  STORAGE_BACKOFF_S) are read at call time from that module: set them there, not here.
- `failures`: `storage_failure`, a one-line StorageError naming the cause for people.

Secrets (redaction, scrubbing) live in `m2f.pipeline.secrets`.
"""

from m2f.pipeline.storage.atomic import is_temporary, remove_temporaries, temporary_path, write_atomic
from m2f.pipeline.storage.failures import NO_CREDENTIALS, StorageError, storage_failure
from m2f.pipeline.storage.opening import (
    Storage,
    bounded_s3_options,
    is_local,
    is_object_store,
    open_fs,
    protocol_of,
    qualify,
    storage_options,
)
from m2f.pipeline.storage.retries import backoff_s, is_transient, with_retries

__all__ = [
    "NO_CREDENTIALS",
    "Storage",
    "StorageError",
    "backoff_s",
    "bounded_s3_options",
    "is_local",
    "is_object_store",
    "is_temporary",
    "is_transient",
    "open_fs",
    "protocol_of",
    "qualify",
    "remove_temporaries",
    "storage_failure",
    "storage_options",
    "temporary_path",
    "with_retries",
    "write_atomic",
]
