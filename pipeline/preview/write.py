"""Choosing which rows to preview and writing their PNGs and the index page under OUTPUT/_previews/.

`pick_rows` reads the dataset's part files; `write_previews` renders each chosen row's image
(`picture.render_preview`), names it after its source (`preview_name`) and lists them all on
`OUTPUT/_previews/index.html` (`index_page.index_html`).
"""

from __future__ import annotations

import logging
import posixpath
import re
import unicodedata
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem

from m2f.pipeline.output import PREVIEWS_DIR, list_part_files, preview_index
from m2f.pipeline.preview.index_page import PreviewEntry, index_html
from m2f.pipeline.preview.picture import preview_png
from m2f.pipeline.schema import STATUS_OK, image_id
from m2f.pipeline.storage import Storage, qualify, write_atomic

MAX_STEM = 40  # characters of the source file's stem kept in a preview's name

log = logging.getLogger(__name__)


def preview_name(uri: str, image_id: str) -> str:
    """`<stem>-<image_id>.png`: the source file's stem, reduced to ASCII letters, digits, `._-` and MAX_STEM
    characters ("image" when nothing is left), so previews sort and read like their sources."""
    path = urlsplit(uri).path if uri.lower().startswith(("http://", "https://")) else uri
    stem = posixpath.splitext(path.rstrip("/").rsplit("/", 1)[-1])[0]
    stem = unicodedata.normalize("NFKD", stem).encode("ascii", "ignore").decode("ascii")  # é -> e
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._-")[:MAX_STEM].rstrip("._-")
    return f"{stem or 'image'}-{image_id}.png"


_NEWEST_COLUMNS = ["image_id", "status", "processed_at"]  # enough to find each image's newest ok row
_ROW_COLUMNS = [*_NEWEST_COLUMNS, "image_uri", "width", "height", "segments", "model", "task", "run_id"]  # to show it


def _first_distinct(uris: Iterable[str], n: int) -> list[str]:
    """The first n distinct URIs, consuming no more of `uris` than that needs."""
    seen: dict[str, None] = {}
    if n > 0:
        for uri in uris:
            seen.setdefault(uri, None)
            if len(seen) == n:
                break
    return list(seen)


def _smallest_ok_uris(fs: AbstractFileSystem, parts: Sequence[str], n: int) -> list[str]:
    """The n smallest distinct image URIs that have an ok row among `parts`."""
    best: list[str] = []
    for path in parts:
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=["image_uri", "status"])
        ok = table.filter(pc.equal(table["status"], STATUS_OK))["image_uri"]
        best = sorted(set(best) | set(pc.unique(ok).to_pylist()))[:n]
    return best


def pick_rows(
    fs: AbstractFileSystem, parts: Sequence[str], n: int, *, uris: Iterable[str] | None = None
) -> list[tuple[str, dict[str, Any] | None]]:
    """(uri, its newest ok row or None) for the first n distinct `uris`, in their order; without `uris`, for
    the n smallest image URIs that have an ok row (deterministic whatever the file layout).

    Any run's row counts; of several ok rows of an image (an --overwrite under way) the newest
    (`processed_at`) is taken. Reads two narrow columns of every part file, then the rows themselves
    from the files that hold them.
    """
    if n < 0:
        raise ValueError(f"the number of previews must be >= 0, got {n}")
    wanted = _first_distinct(uris, n) if uris is not None else _smallest_ok_uris(fs, parts, n)
    ids = {image_id(uri): uri for uri in wanted}
    newest: dict[str, tuple[Any, str]] = {}  # image_id -> (processed_at, path)
    id_array = pa.array(sorted(ids), pa.string())
    for path in parts:
        if not ids:
            break
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=_NEWEST_COLUMNS)
        table = table.filter(pc.and_(pc.is_in(table["image_id"], id_array), pc.equal(table["status"], STATUS_OK)))
        for iid, when in zip(table["image_id"].to_pylist(), table["processed_at"].to_pylist(), strict=True):
            if iid not in newest or _later(when, newest[iid][0]):
                newest[iid] = (when, path)
    rows: dict[str, dict[str, Any]] = {}
    for path in sorted({path for _, path in newest.values()}):
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=_ROW_COLUMNS)
        mine = pa.array(sorted(i for i, (_, p) in newest.items() if p == path), pa.string())
        table = table.filter(pc.and_(pc.is_in(table["image_id"], mine), pc.equal(table["status"], STATUS_OK)))
        for row in table.to_pylist():
            held = rows.get(row["image_id"])
            if held is None or _later(row["processed_at"], held["processed_at"]):
                rows[row["image_id"]] = row
    return [(uri, rows.get(iid)) for iid, uri in ids.items()]


def _png_size(png: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def _later(a: Any, b: Any) -> bool:
    return b is None or (a is not None and a > b)


def write_previews(
    fs: AbstractFileSystem,
    root: str,
    n: int,
    *,
    uris: Iterable[str] | None = None,
    storage: Storage | None = None,
    max_pixels: int = 100_000_000,
) -> int:
    """Write overlays of n images of the dataset under `root` to `root/_previews/<stem>-<image_id>.png`, and
    `root/_previews/index.html` listing them.

    uris: the run's listing, in order; the first n distinct URIs are previewed (an image without an ok row
    is listed on the page without a preview), and no more of the iterable is consumed. None: the n smallest
    image URIs with an ok row. A preview that fails (the image moved, changed size) is logged, noted on the
    page and skipped: previews never fail a run. `storage` opens the images (None: local files only).
    Returns how many PNGs were written.
    """
    storage = storage or Storage()
    parts = list_part_files(fs, root)
    folder = posixpath.join(root, PREVIEWS_DIR)
    entries = []
    for uri, row in pick_rows(fs, parts, n, uris=uris):
        iid = image_id(uri)
        if row is None:
            entries.append(PreviewEntry(uri=uri, image_id=iid, note="no ok row in this output"))
            continue
        about = f"{row['model']} \u00b7 {row['task']} \u00b7 run {row['run_id']}"
        known = {"uri": uri, "image_id": iid, "source_size": (row["width"], row["height"]), "about": about}
        segments = row["segments"] or []
        try:
            image_fs, path = storage.open(uri)
            size = (row["height"], row["width"])
            png = preview_png(image_fs.cat_file(path), segments, max_pixels=max_pixels, size=size)
            name = preview_name(uri, iid)
            write_atomic(fs, posixpath.join(folder, name), png)
        except Exception as e:
            log.warning("no preview for image %s: %s", iid, type(e).__name__)
            entries.append(PreviewEntry(**known, note=f"the preview failed ({type(e).__name__})"))
            continue
        entries.append(PreviewEntry(**known, png=name, size=_png_size(png), segments=segments))
    if entries:
        write_atomic(fs, preview_index(root), index_html(entries, output=qualify(fs, root)))
    return sum(e.png is not None for e in entries)
