"""The two stages up to the model: `prepare_images` (CPU tasks) and `Segmenter` (the model actor).

`prepare_images` reads each listed URI, decodes it and resizes it (`decode_resized`) by the model's
preprocessing rule; `Segmenter` batches equal padded sizes through the network and hands each image's
segments on in the compact form (COMPACT_SCHEMA rows, `pipeline.handover`), which `encode_rows`, a CPU
stage after it, turns into OUTPUT_SCHEMA rows. All take and return plain batches, so they run and test without Ray.

Between the first two stages a row is one listed image, laid out as WORK_SCHEMA. A file that cannot be
read or decoded travels on as a row with status "error" and its reason; the Segmenter passes it on as the
image's error row untouched. Nothing in a batch raises for one bad input.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from m2f.model.config import PreprocessConfig
from m2f.model.preprocess import resized_size
from m2f.pipeline.compact import CompactPrediction
from m2f.pipeline.decode import DecodeError, decode_resized
from m2f.pipeline.handover import compact_error_row, compact_row, compact_table
from m2f.pipeline.predictor import Predictor, check_precision
from m2f.pipeline.reading import CREDENTIALS_IN_URI, ReadLimits, Unreadable, read_all
from m2f.pipeline.schema import STATUS_ERROR, STATUS_OK, describe, stage_fields
from m2f.pipeline.secrets import has_userinfo, scrub, secret_values
from m2f.pipeline.storage import Storage, open_fs, protocol_of

# One listed image between the prepare stage and the model. The columns it shares with the output row have
# their types (`stage_fields`), with sentinels instead of nulls so that the integer columns stay integer when
# Ray hands them over as numpy arrays: error "" when ok; the upright original width, height 0 on error;
# source_bytes -1 when the file could not be read.
WORK_SCHEMA = pa.schema(
    [
        *stage_fields("image_uri", "status", "error", "width", "height", "source_bytes"),
        pa.field("image", pa.binary()),  # resized (h, w, 3) uint8 RGB, C order; empty on error
        pa.field("image_height", pa.int32()),  # h, w of `image`; 0 on error
        pa.field("image_width", pa.int32()),
    ]
)

# --- prepare: read, decode, resize ----------------------------------------------------------------


def prepare_images(
    batch: Mapping[str, Sequence[Any]],
    *,
    preprocess: PreprocessConfig,
    max_pixels: int,
    storage: Storage | None = None,
    limits: ReadLimits | None = None,
) -> pa.Table:
    """batch {"image_uri": [...]} -> WORK_SCHEMA rows: the resized pixels, or an error reason.

    Each URI is inspected before it is read and read within `limits` (`pipeline.reading`: regular files
    only, at most `limits.max_file_bytes`, a deadline per read, a byte budget for the reads ahead); decoding
    follows one image at a time, as each read arrives. Options for each URI come from
    `storage.options(uri)` (None: local files only).
    """
    storage = storage or Storage()
    uris = [str(u) for u in batch["image_uri"]]
    options_by_protocol: dict[str, dict[str, Any]] = {}
    for uri in uris:
        protocol = protocol_of(uri)
        if protocol not in options_by_protocol:
            options_by_protocol[protocol] = storage.options(uri)
    secrets = secret_values({"options": list(options_by_protocol.values())})

    def open_uri(uri: str) -> tuple[Any, str]:
        if has_userinfo(uri):  # a manifest's entry with user:password@ (listed with the secret masked)
            raise Unreadable(CREDENTIALS_IN_URI)
        return open_fs(uri, options_by_protocol[protocol_of(uri)])

    columns: dict[str, list[Any]] = {field.name: [] for field in WORK_SCHEMA}
    # Transient storage failures (5xx, throttling, dropped connections, a body cut short, which s3fs raises
    # as ClientPayloadError, never as short data) are retried inside read_all; a missing file is not.
    for uri, data in read_all(uris, open_uri, limits or ReadLimits(), lambda e: scrub(describe(e), secrets)):
        row = _prepare_one(uri, data, preprocess, max_pixels, secrets)
        del data  # the file's bytes go before the next file is taken (the read budget counts on it)
        for name, value in row.items():
            columns[name].append(value)
    return pa.table(columns, schema=WORK_SCHEMA)


def _prepare_one(
    uri: str, data: bytes | str, preprocess: PreprocessConfig, max_pixels: int, secrets: Sequence[str]
) -> dict[str, Any]:
    row = {"image_uri": uri, "status": STATUS_ERROR, "error": "", "width": 0, "height": 0, "source_bytes": -1}
    row.update({"image": b"", "image_height": 0, "image_width": 0})
    if isinstance(data, str):
        return {**row, "error": data}
    row["source_bytes"] = len(data)
    try:
        # upright (H, W) and the resized (h, w, 3) uint8, without a full-size array (pipeline.budget)
        (height, width), resized = decode_resized(data, partial(resized_size, cfg=preprocess), max_pixels=max_pixels)
    except DecodeError as e:
        return {**row, "error": e.reason}
    except Exception as e:  # MemoryError on a huge image, a Pillow bug: still only this file's error
        return {**row, "error": f"decode failed: {scrub(describe(e), secrets)}"}
    return {
        **row,
        "status": STATUS_OK,
        "width": width,
        "height": height,
        "image": resized.tobytes(),
        "image_height": resized.shape[0],
        "image_width": resized.shape[1],
    }


# --- the model actor ------------------------------------------------------------------------------


class Segmenter:
    """The model actor: loads the checkpoint once, then turns WORK_SCHEMA batches into compact rows.

    `__call__(batch)` takes the prepared rows as numpy columns (Ray's "numpy" batch format, or any
    mapping of sequences) and returns a pyarrow Table with exactly COMPACT_SCHEMA, one row per input row
    in input order. Images are grouped by padded size into forward passes of at most `batch_size`
    (padding changes predictions, so a group never mixes sizes); a group that fails is retried image
    by image, and an image that still fails becomes an error row. The image -> segments work itself is
    the `Predictor`'s, up to the compact form on the device; RLE encoding, statistics and the output row
    are `pipeline.handover.encode_rows`', in CPU tasks, so that they never hold the accelerator back.
    """

    def __init__(
        self,
        model_uri: str | list[Any],
        *,
        run_id: str,
        device: str = "cpu",
        task: str | None = None,
        precision: str = "fp32",
        batch_size: int = 4,
        score_threshold: float = 0.0,
        preset: str | None = None,
        storage: Storage | None = None,
        num_threads: int | None = None,
    ) -> None:
        from m2f.model import load  # the checkpoint loaders are only needed where the model lives

        if isinstance(model_uri, list):  # the checkpoint's bytes in Ray's object store (the driver fetched it)
            model_uri = _unpacked(model_uri[0])

        self.device = torch.device(device)
        check_precision(precision, self.device.type)  # a bad setting fails before the checkpoint is read
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_threads is not None:
            torch.set_num_threads(max(1, num_threads))
        self.model_uri = model_uri
        options = (storage or Storage()).options(model_uri)
        self.model = load(model_uri, self.device, preset=preset, storage_options=options)
        self.predictor = Predictor(self.model, task=task, precision=precision, score_threshold=score_threshold)
        self.task = self.predictor.task
        self.batch_size = batch_size
        self.run_id = run_id
        self.model_name = model_label(self.model.config.name, self.model.checkpoint_sha256)
        self.secrets = secret_values(options)

    def __call__(self, batch: Mapping[str, Sequence[Any]]) -> pa.Table:
        n = len(batch["image_uri"])
        rows: list[dict[str, Any] | None] = [None] * n
        todo, images = [], []
        for i in range(n):
            if str(batch["status"][i]) == STATUS_OK:
                h, w = int(batch["image_height"][i]), int(batch["image_width"][i])
                images.append(np.frombuffer(batch["image"][i], dtype=np.uint8).reshape(h, w, 3).copy())  # writable
                todo.append(i)
            else:
                rows[i] = self._error(batch, i, str(batch["error"][i]) or "unknown error")
        for group in self.predictor.groups(images, self.batch_size):
            members = [todo[g] for g in group]
            for i, row in zip(members, self._segment_group(batch, members, [images[g] for g in group]), strict=True):
                rows[i] = row
        return compact_table(rows)

    def _segment_group(self, batch: Mapping[str, Sequence[Any]], members: list[int], images: list[np.ndarray]):
        """Rows for one group of equal padded size; on failure, each image alone."""
        try:
            return self._forward(batch, members, images)
        except Exception as e:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # an out-of-memory group may fit one image at a time
            if len(members) == 1:
                return [self._error(batch, members[0], f"inference failed: {scrub(describe(e), self.secrets)}")]
        rows = []
        for i, image in zip(members, images, strict=True):
            rows.extend(self._segment_group(batch, [i], [image]))
        return rows

    def _forward(
        self, batch: Mapping[str, Sequence[Any]], members: list[int], images: list[np.ndarray]
    ) -> list[dict[str, Any]]:
        start = time.perf_counter()
        output_sizes = [(int(batch["height"][i]), int(batch["width"][i])) for i in members]
        predictions = self.predictor.predict(images, output_sizes)
        per_image_ms = (time.perf_counter() - start) * 1000.0 / len(members)
        return [self._ok(batch, i, p, per_image_ms) for i, p in zip(members, predictions, strict=True)]

    def _ok(
        self, batch: Mapping[str, Sequence[Any]], i: int, prediction: CompactPrediction, inference_ms: float
    ) -> dict[str, Any]:
        return compact_row(
            str(batch["image_uri"][i]),
            prediction,
            self.predictor.classes(prediction),
            model=self.model_name,
            run_id=self.run_id,
            inference_ms=inference_ms,
            source_bytes=_source_bytes(batch, i),
        )

    def _error(self, batch: Mapping[str, Sequence[Any]], i: int, reason: str) -> dict[str, Any]:
        return compact_error_row(
            str(batch["image_uri"][i]),
            reason,
            task=self.task,
            model=self.model_name,
            run_id=self.run_id,
            source_bytes=_source_bytes(batch, i),
        )


def _source_bytes(batch: Mapping[str, Sequence[Any]], i: int) -> int | None:
    value = int(batch["source_bytes"][i])
    return None if value < 0 else value


def _unpacked(ref: Any) -> str:
    """The checkpoint a driver shipped through Ray's object store, written once per node into the cache."""
    import ray

    from m2f.model.fetch import unpack
    from m2f.model.url_cache import cache_root

    return unpack(ray.get(ref), cache_root())


def model_label(name: str, sha256: str) -> str:
    """The `model` column: the checkpoint's name and the first 12 hex digits of its sha256."""
    return f"{name}@{sha256[:12]}"
