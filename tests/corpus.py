"""The awkward-input corpus: every kind of file a nightly job meets, made with Pillow at test time.

`build_corpus()` returns the files (relative path -> bytes) with the expected outcome of each
image; `write_corpus(root, fs)` writes them to a local folder or any fsspec filesystem (S3 on
moto). Images are tiny (except the 4000x20 strip) so a model can run over all of them quickly.
"""

from __future__ import annotations

import functools
import io
import os
import posixpath
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from fsspec import AbstractFileSystem
from PIL import Image

from m2f.pipeline.storage import is_local

BOMB_SIZE = (20_000, 20_000)  # 400 Mpx claimed by the header, ~50 KB on disk
UNICODE_KEY = "dir with space/ümlaut café.jpg"


@dataclass(frozen=True)
class Expected:
    """What decoding a corpus file must give: ok with upright (width, height), or an error whose
    reason starts with `reason` (a decode.py category)."""

    ok: bool
    size: tuple[int, int] | None = None
    reason: str | None = None


@dataclass(frozen=True)
class Corpus:
    files: Mapping[str, bytes]  # every file, relative path -> content
    expected: Mapping[str, Expected]  # the files a folder listing yields
    skipped: tuple[str, ...]  # the files a folder listing skips (non-images, hidden)

    def uris(self, root_uri: str) -> dict[str, Expected]:
        """Expected outcome keyed by full URI under `root_uri` (a local folder or s3://bucket/prefix)."""
        root = root_uri.rstrip("/")
        return {f"{root}/{rel}": exp for rel, exp in self.expected.items()}


def ok(width: int, height: int) -> Expected:
    return Expected(ok=True, size=(width, height))


def error(reason: str) -> Expected:
    return Expected(ok=False, reason=reason)


def _save(image: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def _noise(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit greyscale PNG of `width` x `height` zeros: huge in pixels, tiny in bytes.

    Written by hand (rows streamed through zlib) so the test never allocates the image.
    """
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grey, no interlace
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    block = row * 1000
    parts = [compressor.compress(block) for _ in range(height // 1000)]
    parts.append(compressor.compress(row * (height % 1000)))
    parts.append(compressor.flush())
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", b"".join(parts))
        + _png_chunk(b"IEND", b"")
    )


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height` RGB but holds no pixel data at all."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IEND", b"")


def exif_rotated_jpeg() -> bytes:
    """Stored 40x20 (left half red, right half blue) with EXIF orientation 6: upright 20x40,
    red on top."""
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(Image.fromarray(pixels), "JPEG", quality=95, exif=exif.tobytes())


def grey16_png() -> bytes:
    """64x8 16-bit grey, a ramp 0..65535 along x (0 at the left, 65535 at the right)."""
    ramp = np.linspace(0, 65535, 64).round().astype(np.uint16)
    return _save(Image.fromarray(np.tile(ramp, (8, 1))), "PNG")


def palette_transparent_png() -> bytes:
    """16x16 palette PNG: left half index 0 (transparent), right half index 1 (opaque red)."""
    image = Image.new("P", (16, 16), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0, 0, 0] * 254)
    image.paste(1, (8, 0, 16, 16))
    return _save(image, "PNG", transparency=0)


def animated_gif() -> bytes:
    """30x20, three frames: red, green, blue; the first frame is red."""
    frames = [Image.new("RGB", (30, 20), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def multipage_tiff() -> bytes:
    """Page 1 is 24x16 green, page 2 is 48x32 blue: the first page wins."""
    first = Image.new("RGB", (24, 16), (0, 255, 0))
    second = Image.new("RGB", (48, 32), (0, 0, 255))
    return _save(first, "TIFF", save_all=True, append_images=[second])


def cmyk_jpeg() -> bytes:
    """32x24 CMYK JPEG of pure red (C=0, M=Y=255, K=0)."""
    return _save(Image.new("CMYK", (32, 24), (0, 255, 255, 0)), "JPEG", quality=95)


def truncated_jpeg() -> bytes:
    whole = _save(_noise(64, 48, seed=1), "JPEG", quality=90)
    return whole[: len(whole) // 2]


@functools.lru_cache(maxsize=1)
def build_corpus() -> Corpus:
    """All corpus files and expectations (cached: the bomb takes a moment to compress)."""
    images: dict[str, tuple[bytes, Expected]] = {
        "empty.jpg": (b"", error("empty file")),
        "truncated.jpg": (truncated_jpeg(), error("truncated or corrupt")),
        "not_an_image.png": (b"this is a text file, not a PNG\n", error("not an image")),
        "bomb.png": (png_bomb(*BOMB_SIZE), error("too many pixels")),
        "cmyk.jpg": (cmyk_jpeg(), ok(32, 24)),
        "grey16.png": (grey16_png(), ok(64, 8)),
        "palette_transparent.png": (palette_transparent_png(), ok(16, 16)),
        "exif_rotated.jpg": (exif_rotated_jpeg(), ok(20, 40)),
        "animated.gif": (animated_gif(), ok(30, 20)),
        "multipage.tiff": (multipage_tiff(), ok(24, 16)),
        "tiny.png": (_save(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG"), ok(1, 1)),
        "wide.png": (_save(Image.new("RGB", (4000, 20), (90, 90, 200)), "PNG"), ok(4000, 20)),
        UNICODE_KEY: (_save(_noise(16, 12, seed=2), "JPEG"), ok(16, 12)),
        "UPPER.JPG": (_save(_noise(12, 8, seed=3), "JPEG"), ok(12, 8)),
        "nested/level1/SHOUT.PNG": (_save(_noise(10, 10, seed=4), "PNG"), ok(10, 10)),
        "nested/level1/level2/deep.jpg": (_save(_noise(24, 24, seed=5), "JPEG"), ok(24, 24)),
        "nested/formats/photo.jpeg": (_save(_noise(8, 6, seed=6), "JPEG"), ok(8, 6)),
        "nested/formats/pic.webp": (_save(_noise(8, 6, seed=7), "WEBP"), ok(8, 6)),
        "nested/formats/pic.bmp": (_save(_noise(8, 6, seed=8), "BMP"), ok(8, 6)),
        "nested/formats/scan.tif": (_save(_noise(8, 6, seed=9), "TIFF"), ok(8, 6)),
    }
    others: dict[str, bytes] = {
        "README.txt": b"Not an image: the listing must skip me.\n",
        "data.json": b'{"not": "an image"}\n',
        "nested/level1/notes.md": b"# notes\n",
        "nested/.DS_Store": b"\x00\x00\x00\x01Bud1",
        "nested/level1/._SHOUT.PNG": b"\x00\x05\x16\x07AppleDouble resource fork",  # hidden: skipped
    }
    files = {rel: data for rel, (data, _) in images.items()} | others
    return Corpus(
        files=files,
        expected={rel: exp for rel, (_, exp) in images.items()},
        skipped=tuple(sorted(others)),
    )


def write_corpus(root: str, fs: AbstractFileSystem | None = None) -> Corpus:
    """Write the corpus under `root`: a local folder, or a path on `fs` (e.g. "bucket/prefix" on
    s3fs). Returns the corpus, whose `uris(root_uri)` gives the expectations by URI."""
    corpus = build_corpus()
    if fs is None:
        for rel, data in corpus.files.items():
            path = os.path.join(root, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
        return corpus
    root = root.rstrip("/")
    targets = {posixpath.join(root, rel): data for rel, data in corpus.files.items()}
    if is_local(fs):
        for path in targets:
            fs.makedirs(posixpath.dirname(path), exist_ok=True)
    fs.pipe(targets)
    return corpus
