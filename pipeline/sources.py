"""Input discovery: turn INPUT (folder/prefix, glob or manifest) into a stream of image URIs.

The listing is lazy: folders are walked one directory at a time and manifests read in batches,
so the driver never holds more than one directory (or one batch) of paths. A manifest is the
documented way to feed millions of images; a glob is expanded by the filesystem in one go.

Rules, in the order `list_inputs` applies them:
- a path containing `*`, `?` or `[` is a glob; matches are filtered by image extension;
- an existing file ending in .txt, .csv or .parquet (or a folder ending in .parquet, a Parquet
  dataset) is a manifest; its URIs are taken as given, with no extension filter;
- any other existing file is a single input, taken as given;
- an existing folder/prefix is walked recursively: image extensions only (case-insensitive),
  hidden names (starting with ".") skipped, symlinked folders not followed (no cycles);
- anything else raises FileNotFoundError naming the input;
- OUTPUT is never listed (`exclude`): a run whose OUTPUT lies inside INPUT would otherwise segment its own
  previews on the next run. Everything under OUTPUT is left out, or, where INPUT itself lies inside
  OUTPUT, OUTPUT's own folders (`_runs`, `_previews`, `_quarantine`); such URIs count as skipped;
- a manifest entry with user-info (`s3://KEY:SECRET@bucket/x.jpg`) is listed with it masked
  (`s3://***@bucket/x.jpg`): the secret never reaches a work file, a row or a log, and the masked URI
  becomes that line's error row where it is read.
"""

from __future__ import annotations

import functools
import os
import posixpath
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.dataset as pa_ds
from fsspec import AbstractFileSystem

from m2f.pipeline.output import PREVIEWS_DIR, QUARANTINE_DIR, RUNS_DIR
from m2f.pipeline.paths import same_or_under
from m2f.pipeline.secrets import without_userinfo
from m2f.pipeline.storage import is_local, open_fs, protocol_of, qualify, with_retries

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"})
MANIFEST_SUFFIXES = (".txt", ".csv", ".parquet")
URI_COLUMN = "uri"
GLOB_CHARS = ("*", "?", "[")
MAX_SKIPPED_RECORDED = 1000  # a sample for the run report; the count is always exact
MANIFEST_BATCH_ROWS = 65_536
MAX_ENTRY_CHARS = 8192  # a manifest line longer than this is no URI: skipped (and counted), never held whole
TOO_LONG = "(manifest line too long)"

Kind = Literal["folder", "glob", "manifest", "file"]


def is_image_name(name: str) -> bool:
    """Whether a file name has one of the image extensions (case-insensitive)."""
    ext = posixpath.splitext(name)[1]
    return ext[1:].lower() in IMAGE_EXTENSIONS


def _extension(name: str) -> str:
    ext = posixpath.splitext(name)[1].lower()
    return ext if ext else "(none)"


@dataclass
class Listing:
    """The inputs of one run. Iterate `uris()` (again for a fresh listing); the counters describe
    the last completed or running iteration.

    `skipped_count` is exact; `skipped` keeps the first MAX_SKIPPED_RECORDED URIs as a sample;
    `skipped_by_extension` counts them by lower-case extension ("(none)" if none).
    """

    input: str
    kind: Kind
    fs: AbstractFileSystem = field(repr=False)
    path: str
    listed_count: int = 0
    skipped_count: int = 0
    skipped: list[str] = field(default_factory=list)
    skipped_by_extension: Counter[str] = field(default_factory=Counter)
    exclude: tuple[str, ...] = ()  # qualified URIs (OUTPUT, or its own folders) never listed, nor what is under them
    excluded_count: int = 0  # URIs left out by `exclude` (also counted as skipped)

    def uris(self) -> Iterator[str]:
        """Image URIs, fully qualified, in a deterministic order."""
        self.listed_count = 0
        self.skipped_count = 0
        self.skipped = []
        self.skipped_by_extension = Counter()
        self.excluded_count = 0
        if self.kind == "folder":
            source = self._walk()
        elif self.kind == "glob":
            source = self._glob()
        elif self.kind == "manifest":
            source = _read_manifest(self.fs, self.path)
        else:
            source = iter([qualify(self.fs, self.path)])
        for uri in source:
            if uri == TOO_LONG:
                self._skip(uri)
                continue
            if self.exclude and _under_any(uri, self.exclude):
                self.excluded_count += 1
                self._skip(uri)
                continue
            self.listed_count += 1
            yield uri

    def __iter__(self) -> Iterator[str]:
        return self.uris()

    def batches(self, size: int) -> Iterator[list[str]]:
        """`uris()` in lists of at most `size`, for feeding a dataset in bounded chunks."""
        if size < 1:
            raise ValueError(f"batch size must be >= 1, got {size}")
        batch: list[str] = []
        for uri in self.uris():
            batch.append(uri)
            if len(batch) == size:
                yield batch
                batch = []
        if batch:
            yield batch

    def summary(self) -> dict[str, Any]:
        """Counters for the run report (no filesystem object, nothing secret)."""
        return {
            "input": self.input,
            "kind": self.kind,
            "listed": self.listed_count,
            "skipped": self.skipped_count,
            "skipped_by_extension": dict(sorted(self.skipped_by_extension.items())),
            "skipped_sample": list(self.skipped),
            "output_excluded": self.excluded_count,
        }

    def _skip(self, path: str) -> None:
        self.skipped_count += 1
        self.skipped_by_extension[path if path == TOO_LONG else _extension(posixpath.basename(path))] += 1
        if len(self.skipped) < MAX_SKIPPED_RECORDED:
            self.skipped.append(path if path == TOO_LONG or "://" in path else qualify(self.fs, path))

    def _walk(self) -> Iterator[str]:
        # Depth first: a folder's files (sorted), then its subfolders (sorted), one `ls` each.
        stack = [self.path.rstrip("/") or self.path]
        while stack:
            folder = stack.pop()
            entries = sorted(with_retries(functools.partial(self.fs.ls, folder, detail=True)), key=lambda e: e["name"])
            # s3fs caches every listing; drop it so a huge walk does not accumulate in memory.
            self.fs.invalidate_cache(folder)
            subfolders = []
            for entry in entries:
                path = entry["name"].rstrip("/")
                name = posixpath.basename(path)
                if path == folder.rstrip("/") or not name:
                    continue  # an S3 "folder marker" object or the folder itself
                if entry["type"] == "directory":
                    if name.startswith(".") or entry.get("islink"):
                        continue
                    if self.exclude and _under_any(qualify(self.fs, path), self.exclude):
                        continue  # OUTPUT (or one of its folders): not walked at all
                    subfolders.append(path)
                elif entry["type"] == "other" and not entry.get("islink"):
                    self._skip(path)  # a FIFO, socket or device: reading it could block
                elif name.startswith(".") or not is_image_name(name):
                    self._skip(path)
                else:
                    yield qualify(self.fs, path)
            stack.extend(reversed(subfolders))

    def _glob(self) -> Iterator[str]:
        matches = with_retries(lambda: self.fs.glob(self.path, detail=True))
        for path in sorted(matches):
            if matches[path].get("type") == "directory":
                continue
            if is_image_name(path) and not posixpath.basename(path).startswith("."):
                yield qualify(self.fs, path)
            else:
                self._skip(path)


def has_glob(path: str) -> bool:
    return any(c in path for c in GLOB_CHARS)


def list_inputs(input: str, options: dict[str, Any], *, output: str | None = None) -> Listing:
    """Classify INPUT and check that it exists; iterate the result's `uris()` for the images.

    Raises FileNotFoundError (naming `input`) if the folder, file or glob base does not exist, and
    ValueError for a manifest without a `uri` column (checked when iteration starts). Any other
    storage failure (no credentials, access denied, an unreachable endpoint) is raised as it is,
    after `with_retries` where it is transient: it never passes for a missing input. Each storage
    call here and in the iteration is retried on its own, so callers need not retry these again.

    `output`: OUTPUT as a qualified URI (`storage.qualify` of its filesystem and path), left out of the
    listing (see the module docstring).
    """
    if not input:
        raise ValueError("INPUT is empty")
    fs, path = open_fs(input, options)
    listing = _classify(input, fs, path)
    if output:
        listing.exclude = excluded_by(qualify(fs, _glob_base(path) if has_glob(path) else path), output)
    return listing


def excluded_by(input_uri: str, output_uri: str) -> tuple[str, ...]:
    """What a listing of `input_uri` leaves out for OUTPUT `output_uri` (both qualified): OUTPUT and all under
    it, or only OUTPUT's own folders when INPUT lies inside OUTPUT (the images are the user's there)."""
    output_uri = output_uri.rstrip("/") or output_uri
    if _under_any(input_uri, (output_uri,)):
        return tuple(posixpath.join(output_uri, name) for name in (RUNS_DIR, PREVIEWS_DIR, QUARANTINE_DIR))
    return (output_uri,)


def _under_any(uri: str, roots: tuple[str, ...]) -> bool:
    """Whether `uri` is one of `roots` or lies under one (`paths.same_or_under`, the check OUTPUT's own
    validation uses)."""
    return any(same_or_under(uri, root) for root in roots)


def _classify(input: str, fs: AbstractFileSystem, path: str) -> Listing:
    if has_glob(path):
        base = _glob_base(path)
        if base and _entry_type(fs, base) is None:
            raise FileNotFoundError(f"input {input!r}: {base!r} (the folder the glob starts from) does not exist")
        return Listing(input=input, kind="glob", fs=fs, path=path)
    entry_type = _entry_type(fs, path)
    if entry_type == "file":
        kind: Kind = "manifest" if path.lower().endswith(MANIFEST_SUFFIXES) else "file"
        return Listing(input=input, kind=kind, fs=fs, path=path)
    if entry_type == "directory":
        kind = "manifest" if path.rstrip("/").lower().endswith(".parquet") else "folder"
        return Listing(input=input, kind=kind, fs=fs, path=path)
    if entry_type is not None:  # a FIFO, a device or a socket: reading it could block or never end
        raise ValueError(f"input {input!r} is not a regular file or folder (fsspec type {entry_type!r})")
    raise FileNotFoundError(f"input {input!r} does not exist (no such file, folder or prefix)")


def _entry_type(fs: AbstractFileSystem, path: str) -> str | None:
    """The type of `path`: "file", "directory", another fsspec type, or None where nothing exists.

    Not `fs.isfile`/`fs.exists`: they answer False for any error, so a missing credential or a dead
    endpoint would read as a missing input (after the slow retries of every probe).
    """
    try:
        return str(with_retries(lambda: fs.info(path))["type"])
    except FileNotFoundError:
        return None


def _glob_base(path: str) -> str:
    """The folder a glob starts from: everything before the first path part with a glob char."""
    parts = path.split("/")
    fixed = []
    for part in parts:
        if has_glob(part):
            break
        fixed.append(part)
    return "/".join(fixed)


def _read_manifest(fs: AbstractFileSystem, path: str) -> Iterator[str]:
    base = posixpath.dirname(path.rstrip("/"))
    lower = path.rstrip("/").lower()
    if lower.endswith(".txt"):
        entries = _txt_entries(fs, path)
    elif lower.endswith(".csv"):
        entries = _csv_entries(fs, path)
    else:
        entries = _parquet_entries(fs, path)
    for entry in entries:
        yield entry if entry == TOO_LONG else _resolve(entry, fs, base)


def _txt_entries(fs: AbstractFileSystem, path: str) -> Iterator[str]:
    """The entries of a .txt manifest; a line longer than MAX_ENTRY_CHARS (no URI is: a 1 GB "line" is) is
    consumed a bounded piece at a time and given as TOO_LONG, never held whole."""
    with fs.open(path, "rt", encoding="utf-8-sig") as f:
        while line := f.readline(MAX_ENTRY_CHARS + 1):
            if len(line) > MAX_ENTRY_CHARS and not line.endswith("\n"):
                while (rest := f.readline(MAX_ENTRY_CHARS)) and not rest.endswith("\n"):
                    pass
                yield TOO_LONG
                continue
            entry = line.strip()
            if entry and not entry.startswith("#"):
                yield entry


def _csv_entries(fs: AbstractFileSystem, path: str) -> Iterator[str]:
    # Only the uri column is parsed: the streaming reader fixes column types from the first block,
    # so a later surprise in an unrelated column would otherwise fail the whole manifest.
    convert = pa_csv.ConvertOptions(include_columns=[URI_COLUMN], column_types={URI_COLUMN: pa.string()})
    with fs.open(path, "rb") as f:
        try:
            reader = pa_csv.open_csv(f, read_options=pa_csv.ReadOptions(block_size=1 << 20), convert_options=convert)
        except KeyError:
            raise ValueError(f"manifest {path!r} has no {URI_COLUMN!r} column in its header row") from None
        for batch in reader:
            yield from _column_entries(batch.column(0))


def _parquet_entries(fs: AbstractFileSystem, path: str) -> Iterator[str]:
    dataset = pa_ds.dataset(path, filesystem=fs, format="parquet")
    if URI_COLUMN not in dataset.schema.names:
        raise ValueError(f"manifest {path!r} has no {URI_COLUMN!r} column (columns: {dataset.schema.names})")
    for batch in dataset.to_batches(columns=[URI_COLUMN], batch_size=MANIFEST_BATCH_ROWS):
        yield from _column_entries(batch.column(0))


def _column_entries(column: pa.Array) -> Iterator[str]:
    for value in column.to_pylist():
        if value is not None and value.strip():
            yield value.strip()


def _resolve(entry: str, fs: AbstractFileSystem, base: str) -> str:
    """A manifest entry as a fully qualified URI.

    URIs with a protocol are kept as given (file:// reduced to its path, like folder listings);
    absolute paths are local paths; relative paths are resolved against the manifest's folder,
    on the manifest's own filesystem (so "a/b.jpg" in s3://bkt/m.txt is s3://bkt/a/b.jpg).
    """
    if "://" in entry:
        entry = without_userinfo(entry)
        if protocol_of(entry) == "file":
            return os.path.normpath(entry.split("://", 1)[1])
        return entry
    if entry.startswith("/"):
        return os.path.normpath(entry)
    if is_local(fs):
        return os.path.normpath(os.path.join(base, entry))
    return qualify(fs, posixpath.normpath(posixpath.join(base, entry)))
