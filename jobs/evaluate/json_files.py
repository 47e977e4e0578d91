"""The JSON files evaluation reads (ground truth, class lists) and writes (metrics, COCO exports).

Reading checks what a user can get wrong (a missing file, invalid JSON, the wrong kind of COCO file)
and says so as `BadInput`; writing is atomic, so a scheduler never reads half a metrics file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from m2f.jobs.common.bad_input import BadInput
from m2f.pipeline.storage import Storage, write_atomic


def read_json(uri: str, storage: Storage, what: str) -> Any:
    """The parsed JSON at `uri`; `what` names the file in the error ("ground truth", "categories")."""
    fs, path = storage.open(uri)
    if not fs.isfile(path):
        raise BadInput(f"{what} not found: {uri}")
    with fs.open(path, "rb") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise BadInput(f"{what} {uri} is not valid JSON: {e.msg} at line {e.lineno}") from None


def require(
    data: Any, keys: Sequence[str], uri: str, what: str, fields: Mapping[str, Sequence[str]] | None = None
) -> None:
    """Refuse `data` unless it is an object holding a list under each of `keys` (a `what` JSON), whose
    records (objects) each hold `fields[key]`."""
    if not isinstance(data, dict) or any(not isinstance(data.get(k), list) for k in keys):
        raise BadInput(f"{uri} is not a {what} JSON: it needs the lists {list(keys)}")
    for key, names in (fields or {}).items():
        for i, record in enumerate(data[key]):
            missing = [name for name in names if name not in record] if isinstance(record, dict) else list(names)
            if missing:
                raise BadInput(f"{uri} is not a {what} JSON: {key}[{i}] lacks {', '.join(map(repr, missing))}")


def write_json(uri: str, data: Any, storage: Storage) -> None:
    fs, path = storage.open(uri)
    write_atomic(fs, path, json.dumps(data, default=json_scalar) + "\n")


def json_scalar(value: Any) -> Any:
    """numpy scalars (COCOeval's category ids are np.int64) as plain Python numbers."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
