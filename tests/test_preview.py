"""Previews: the tint lands exactly on a segment's pixels, in its colour; small images are scaled up and big
ones down; labels stay inside the picture without covering each other; a legend strip below names the
classes; `write_previews` takes the first N listed images, names files after their sources and writes an
index page, which headless Chromium renders with the previews in it."""

from __future__ import annotations

import io
import itertools
import re
import shutil
import subprocess
from collections.abc import Iterator
from datetime import timedelta
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from m2f.pipeline.encode import encode_segments, image_stats
from m2f.pipeline.preview import (
    BACKGROUND,
    LEGEND_MIN_WIDTH,
    MAX_STEM,
    PreviewEntry,
    index_html,
    label_spots,
    legend_entries,
    place_labels,
    preview_name,
    preview_size,
    render_legend,
    render_overlay,
    render_preview,
    segment_colour,
    write_previews,
)
from m2f.pipeline.schema import error_row, image_id, ok_row, rows_to_table
from m2f.pipeline.storage import open_fs


def blend(pixels: np.ndarray, colour: tuple[int, int, int], alpha: float) -> np.ndarray:
    """The reference: (1 - alpha) * pixel + alpha * colour, rounded."""
    return np.rint((1 - alpha) * pixels.astype(np.float64) + alpha * np.array(colour, np.float64)).astype(np.uint8)


def scene(height: int = 24, width: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """A noisy image and two masks: a rectangle and a disc overlapping it."""
    image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:height, :width]
    rect = (yy >= 4) & (yy < 14) & (xx >= 3) & (xx < 20)
    disc = (yy - 14) ** 2 + (xx - 20) ** 2 < 36
    return image, np.stack([rect, disc])


def segments_of(masks: np.ndarray, scores: list[float], names: tuple[str, ...] = ("cat", "dog")) -> list[dict]:
    labels = np.arange(len(masks)) % len(names)
    return encode_segments(masks, labels, np.array(scores), class_names=names, is_thing=(True,) * len(names))


def colours_in(pixels: np.ndarray) -> set[tuple[int, int, int]]:
    packed = np.unique(pixels.reshape(-1, 3).astype(np.int32) @ np.array([1 << 16, 1 << 8, 1], np.int32))
    return {(int(c >> 16), int(c >> 8 & 255), int(c & 255)) for c in packed}


# --- the overlay ----------------------------------------------------------------------------------------


def test_overlay_colours_exactly_the_mask_pixels() -> None:
    image, masks = scene()
    out = render_overlay(image, masks[:1], [(255, 0, 0)], alpha=0.5)
    rect = masks[0]
    np.testing.assert_array_equal(out[~rect], image[~rect])  # untouched outside
    np.testing.assert_array_equal(out[rect], blend(image[rect], (255, 0, 0), 0.5))


def test_later_masks_are_drawn_on_top_and_blended_once() -> None:
    image, masks = scene()
    out = render_overlay(image, masks, [(255, 0, 0), (0, 0, 255)], alpha=0.4)
    rect, disc = masks
    np.testing.assert_array_equal(out[disc], blend(image[disc], (0, 0, 255), 0.4))
    np.testing.assert_array_equal(out[rect & ~disc], blend(image[rect & ~disc], (255, 0, 0), 0.4))
    np.testing.assert_array_equal(out[~(rect | disc)], image[~(rect | disc)])


def test_preview_from_rle_segments_puts_the_best_score_on_top() -> None:
    image, masks = scene()
    segments = segments_of(masks, scores=[0.9, 0.2])  # the rectangle wins where they overlap
    canvas = np.asarray(render_preview(image, segments, alpha=0.5, draw_labels=False, min_short_side=None))
    picture = canvas[:24, :32]  # the image sits top-left; the legend strip is below it
    rect, disc = masks
    np.testing.assert_array_equal(picture[rect], blend(image[rect], segment_colour(1), 0.5))
    np.testing.assert_array_equal(picture[disc & ~rect], blend(image[disc & ~rect], segment_colour(2), 0.5))
    np.testing.assert_array_equal(picture[~(rect | disc)], image[~(rect | disc)])
    assert (canvas[:24, 32:] == BACKGROUND).all()  # the canvas is widened for the legend, not the image


@pytest.mark.parametrize(
    ("height", "width", "expected"),
    [
        (24, 32, (683, 512)),  # small: the short side goes up to 512
        (512, 700, (700, 512)),  # already large enough: unchanged
        (300, 2000, (1024, 154)),  # long: down to 1024, even though the short side ends below 512
        (10, 400, (1024, 26)),  # a thin strip: up, but the long side caps it
        (3000, 4000, (1024, 768)),
    ],
)
def test_preview_size(height: int, width: int, expected: tuple[int, int]) -> None:
    assert preview_size(height, width, min_short_side=512, max_side=1024) == expected


def test_small_images_are_scaled_up_with_their_masks() -> None:
    image, masks = scene()
    segments = segments_of(masks, scores=[0.9, 0.2])
    canvas = render_preview(image, segments, draw_labels=False)
    # Nearest neighbour on both the image and the masks: the same as scaling up the native overlay.
    native = render_overlay(image, masks[::-1], [segment_colour(2), segment_colour(1)])
    expected = np.asarray(Image.fromarray(native).resize((683, 512), Image.Resampling.NEAREST))
    assert canvas.width == 683 and canvas.height > 512
    np.testing.assert_array_equal(np.asarray(canvas)[:512], expected)


def test_large_images_are_scaled_down() -> None:
    image = np.zeros((300, 2000, 3), np.uint8)
    mask = np.zeros((1, 300, 2000), bool)
    mask[0, :, :1000] = True
    canvas = render_preview(image, segments_of(mask, [1.0]), max_side=500, draw_labels=False)
    assert canvas.width == 500
    pixels = np.asarray(canvas)[:75]
    np.testing.assert_array_equal(
        pixels[:, :250], np.broadcast_to(blend(image[:1, :1], segment_colour(1), 0.55), (75, 250, 3))
    )
    np.testing.assert_array_equal(pixels[:, 250:], 0)


def test_bad_inputs_raise_value_errors() -> None:
    image, masks = scene()
    with pytest.raises(ValueError, match="colours for"):
        render_overlay(image, masks, [(1, 2, 3)])
    with pytest.raises(ValueError, match="masks must be"):
        render_overlay(image, masks[:, :10], [(1, 2, 3)] * 2)
    with pytest.raises(ValueError, match="RLE size"):
        render_preview(image[:10], segments_of(masks, [0.5, 0.5]))
    with pytest.raises(ValueError, match="2 label sizes for 1"):
        place_labels([(5, 5), (5, 5)], [[(1, 1)]], (10, 10))


# --- labels ---------------------------------------------------------------------------------------------


def assert_valid_placement(boxes: list, bounds: tuple[int, int], gap: int) -> None:
    """The slow, obvious reference: every placed box inside the picture, every pair at least `gap` apart."""
    placed = [b for b in boxes if b is not None]
    for left, top, right, bottom in placed:
        assert 0 <= left < right <= bounds[0] and 0 <= top < bottom <= bounds[1]
    for a, b in itertools.combinations(placed, 2):
        apart_x = a[2] + gap <= b[0] or b[2] + gap <= a[0]
        apart_y = a[3] + gap <= b[1] or b[3] + gap <= a[1]
        assert apart_x or apart_y, (a, b)


def test_labels_on_one_spot_spread_out_or_are_skipped() -> None:
    sizes = [(40, 12)] * 30
    spots = [[(100, 60)]] * 30
    boxes = place_labels(sizes, spots, (200, 120), gap=2)
    assert_valid_placement(boxes, (200, 120), 2)
    assert boxes[0] == (80, 54, 120, 66)  # the first takes its spot, centred
    assert 5 >= sum(b is not None for b in boxes) > 1  # spot, up, down, 2 up, 2 down
    assert boxes[-1] is None


@pytest.mark.parametrize("seed", range(5))
def test_crowded_labels_stay_inside_and_apart(seed: int) -> None:
    rng = np.random.default_rng(seed)
    bounds = (160, 90)
    count = 80
    sizes = [(int(w), int(h)) for w, h in zip(rng.integers(8, 70, count), rng.integers(6, 20, count), strict=True)]
    sizes[3] = (200, 10)  # wider than the picture: skipped
    spots = [[(int(x), int(y)) for x, y in rng.integers(-30, 200, (int(rng.integers(1, 6)), 2))] for _ in sizes]
    boxes = place_labels(sizes, spots, bounds, gap=1)
    assert_valid_placement(boxes, bounds, 1)
    assert boxes[3] is None
    assert boxes[0] is not None  # the first always fits somewhere
    for box, (w, h) in zip(boxes, sizes, strict=True):
        assert box is None or (box[2] - box[0], box[3] - box[1]) == (w, h)


def test_labels_at_the_edge_are_shifted_inside() -> None:
    boxes = place_labels([(30, 10), (30, 10)], [[(0, 0)], [(300, 300)]], (100, 50))
    assert boxes == [(0, 0, 30, 10), (70, 40, 100, 50)]


def test_label_spots_prefer_room_inside_the_mask() -> None:
    # An L shape: a thin vertical bar and a wide foot. The label fits only on the foot.
    mask = np.zeros((100, 100), bool)
    mask[:, :6] = True
    mask[80:, :] = True
    x, y = label_spots(mask, (40, 12))[0]
    left, top = round(x - 20), round(y - 6)
    assert mask[top : top + 12, left : left + 40].all()
    assert label_spots(np.zeros((5, 5), bool), (2, 2)) == []
    tiny = np.zeros((50, 50), bool)
    tiny[20, 30] = True  # no room for a label: still a spot on the mask
    assert label_spots(tiny, (10, 10))[0] == (30, 20)


def test_labels_are_drawn_inside_their_segment() -> None:
    image = np.full((64, 96, 3), 128, np.uint8)
    mask = np.zeros((1, 64, 96), bool)
    mask[0, 16:48, 12:84] = True  # room for the "cat 0.50" tag
    plain = np.asarray(render_preview(image, segments_of(mask, [0.5]), draw_labels=False, min_short_side=None))
    labelled = np.asarray(render_preview(image, segments_of(mask, [0.5]), draw_labels=True, min_short_side=None))
    changed = (plain != labelled).any(axis=2)
    ys, xs = np.nonzero(changed)
    assert ys.size and ys.min() >= 16 and ys.max() < 48 and xs.min() >= 12 and xs.max() < 84


def test_crowded_preview_labels_do_not_touch() -> None:
    """Twelve small discs close together: the tags drawn (black boxes) never merge into one another."""
    image = np.full((40, 60, 3), 200, np.uint8)
    yy, xx = np.mgrid[:40, :60]
    masks = np.stack([(yy - 8 - 8 * (i // 4)) ** 2 + (xx - 8 - 14 * (i % 4)) ** 2 < 12 for i in range(12)])
    segments = segments_of(masks, [0.5 + i / 100 for i in range(12)])
    plain = np.asarray(render_preview(image, segments, draw_labels=False))
    labelled = np.asarray(render_preview(image, segments, draw_labels=True))
    h = 512  # (40, 60) scaled up to (512, 768)
    tags = (plain[:h] != labelled[:h]).any(axis=2)
    np.testing.assert_array_equal(plain[h:], labelled[h:])  # nothing drawn over the legend
    # Tags are drawn as filled boxes at least 2 px apart, so each blob of changed pixels is one whole box,
    # one tag tall; two touching tags would make a blob that is not a filled rectangle or is too tall.
    boxes = _blobs(tags)
    assert len(boxes) >= 4
    for top, left, bottom, right in boxes:
        assert tags[top:bottom, left:right].mean() > 0.97
        assert bottom - top <= 24


def _blobs(mask: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Bounding boxes (top, left, bottom, right) of 4-connected blobs, by flood fill (test helper)."""
    seen = np.zeros_like(mask)
    boxes = []
    for y, x in zip(*np.nonzero(mask), strict=True):
        if seen[y, x]:
            continue
        stack, ys, xs = [(y, x)], [], []
        seen[y, x] = True
        while stack:
            cy, cx = stack.pop()
            ys.append(cy)
            xs.append(cx)
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        boxes.append((min(ys), min(xs), max(ys) + 1, max(xs) + 1))
    return boxes


# --- the legend -----------------------------------------------------------------------------------------


def test_legend_strip_shows_every_segment_colour_below_the_picture() -> None:
    image, masks = scene()
    third = np.zeros_like(masks[0])
    third[18:, :8] = True
    segments = segments_of(np.concatenate([masks, third[None]]), [0.9, 0.6, 0.7], names=("cat", "dog", "cat"))
    canvas = np.asarray(render_preview(image, segments))
    legend = canvas[512:]
    assert legend.shape[0] > 12
    assert {segment_colour(s["id"]) for s in segments} <= colours_in(legend)
    assert legend_entries(segments)[0][0] == "cat"  # two segments of cat cover more than dog's one
    assert [len(colours) for _, colours in legend_entries(segments)] == [2, 1]


def test_legend_wraps_and_keeps_its_width() -> None:
    entries = [(f"class number {i}", [segment_colour(i)]) for i in range(1, 21)]
    one_row = render_legend(entries[:1], LEGEND_MIN_WIDTH)
    many = render_legend(entries, LEGEND_MIN_WIDTH)
    assert many.width == one_row.width == LEGEND_MIN_WIDTH
    assert many.height > 4 * one_row.height  # wrapped into rows, not drawn past the edge
    assert {segment_colour(i) for i in range(1, 21)} <= colours_in(np.asarray(many))
    long = render_legend([("x" * 500, [segment_colour(1)])], LEGEND_MIN_WIDTH)
    assert long.height == one_row.height  # a label too long for a row is cut


# --- names and the index page ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "stem"),
    [
        ("s3://bucket/photos/IMG 0001.JPG", "IMG_0001"),
        ("https://host/a/caf\u00e9.jpeg?X-Amz-Signature=abc", "cafe"),
        ("/data/\u65e5\u672c.png", "image"),
        ("gs://b/.hidden.png", "hidden"),
        ("file:///x/a<b>&c.webp", "a_b_c"),
        ("s3://b/" + "long" * 30 + ".png", ("long" * 30)[:MAX_STEM]),
    ],
)
def test_preview_names_follow_the_source_file(uri: str, stem: str) -> None:
    name = preview_name(uri, image_id(uri))
    assert name == f"{stem}-{image_id(uri)}.png"
    assert re.fullmatch(r"[A-Za-z0-9._-]+", name)


class Tags(HTMLParser):
    """Collects tags and attributes (the page must parse as HTML)."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(page: str) -> Tags:
    tags = Tags()
    tags.feed(page)
    return tags


def test_index_lists_each_preview_with_its_uri_and_segments() -> None:
    image, masks = scene()
    segments = segments_of(masks, [0.98765, 0.5])  # areas 170 and 109: the rectangle first
    uri = 's3://b/<script>alert("x")</script>&.png'
    entries = [
        PreviewEntry(uri=uri, image_id="a" * 16, png="x-aaaa.png", size=(683, 540), segments=segments),
        PreviewEntry(uri="s3://b/ok.png", image_id="b" * 16, png="ok-bbbb.png", size=(683, 540), segments=[]),
        PreviewEntry(uri="s3://b/broken.png", image_id="c" * 16, note="no ok row in this output"),
    ]
    page = index_html(entries, output="s3://b/out")
    assert "<script" not in page and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;.png" in page
    assert "http" not in page  # self-contained: nothing to fetch
    parsed = parse(page)
    assert [a["src"] for t, a in parsed.tags if t == "img"] == ["x-aaaa.png", "ok-bbbb.png"]
    assert sum(t == "table" for t, _ in parsed.tags) == 2  # one per preview
    text = " ".join(parsed.text)
    assert re.search(r"cat\s+0\.988\s+170.*dog\s+0\.500\s+109", text, re.S)
    assert "no segments" in text and "no preview: no ok row in this output" in text
    assert uri in text  # escaped in the source, the URI itself on the page


# --- write_previews -------------------------------------------------------------------------------------


def dataset(tmp_path: Path, names: list[str], *, errors: tuple[str, ...] = ()) -> tuple[Path, list[str]]:
    """Images named `names` and their ok rows (error rows for `errors`) in two part files."""
    image, masks = scene()
    uris = []
    for i, name in enumerate(names):
        path = tmp_path / "images" / name
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(np.roll(image, i, axis=1)).save(path, format="PNG")
        uris.append(str(path))
    common = {"task": "instance", "model": "tiny@0", "run_id": "r"}
    segments = segments_of(masks, [0.9, 0.4])
    stats = image_stats(segments, 24, 32)
    rows = [
        error_row(u, "not an image", **common)
        if file_name(u) in errors
        else ok_row(u, width=32, height=24, segments=segments, stats=stats, inference_ms=1.0, **common)
        for u in uris
    ]
    out = tmp_path / "out"
    out.mkdir()
    # Two part files, in an order unrelated to the listing or the ids.
    pq.write_table(rows_to_table(rows[::2]), out / "part-b.parquet")
    pq.write_table(rows_to_table(rows[1::2]), out / "part-a.parquet")
    return out, uris


def file_name(uri: str) -> str:
    return uri.rsplit("/", 1)[-1]


def pngs(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "_previews").glob("*.png"))


def test_write_previews_takes_the_first_n_listed(tmp_path: Path) -> None:
    names = ["zebra.png", "apple.png", "broken.png", "mango.png", "kiwi.png"]
    out, uris = dataset(tmp_path, names, errors=("broken.png",))
    fs, root = open_fs(str(out), {})

    def listing() -> Iterator[str]:
        yield uris[0]
        yield uris[0]  # listed twice: one preview
        yield from uris[1:3]
        raise AssertionError("read past the first 3 distinct URIs")

    assert write_previews(fs, root, 3, uris=listing()) == 2  # broken.png has no ok row
    assert pngs(out) == sorted(preview_name(u, image_id(u)) for u in uris[:2])
    page = (out / "_previews" / "index.html").read_text()
    parsed = parse(page)
    # In listing order, the image without an ok row noted where it would be.
    sections = [a["id"] for t, a in parsed.tags if t == "section"]
    assert sections == [f"img-{image_id(u)}" for u in uris[:3]]
    assert [a["src"] for t, a in parsed.tags if t == "img"] == [preview_name(u, image_id(u)) for u in uris[:2]]
    assert "no ok row in this output" in page
    assert not [p for p in (out / "_previews").iterdir() if p.name.startswith(".")]  # no temporaries left
    picture = Image.open(io.BytesIO((out / "_previews" / pngs(out)[0]).read_bytes()))
    assert picture.width == 683 and picture.height > 512  # scaled up, legend below


def test_write_previews_without_a_listing_takes_the_smallest_uris(tmp_path: Path) -> None:
    names = ["zebra.png", "apple.png", "broken.png", "mango.png", "kiwi.png"]
    out, uris = dataset(tmp_path, names, errors=("broken.png",))
    fs, root = open_fs(str(out), {})
    assert write_previews(fs, root, 3) == 3
    chosen = sorted(u for u in uris if "broken" not in u)[:3]  # apple, kiwi, mango
    assert pngs(out) == sorted(preview_name(u, image_id(u)) for u in chosen)
    assert write_previews(fs, root, 50) == 4  # never more than the ok rows
    assert write_previews(fs, root, 0) == 0


def test_write_previews_shows_the_newest_row_of_an_image(tmp_path: Path) -> None:
    image, masks = scene()
    path = tmp_path / "one.png"
    Image.fromarray(image).save(path)
    uri = str(path)
    out = tmp_path / "out"
    out.mkdir()
    stats = image_stats(segments_of(masks, [0.9, 0.4]), 24, 32)
    common = {"width": 32, "height": 24, "stats": stats, "inference_ms": 1.0, "task": "instance"}
    old = ok_row(uri, segments=segments_of(masks, [0.9, 0.4]), model="old@0", run_id="r1", **common)
    new = ok_row(uri, segments=segments_of(masks[:1], [0.7], names=("fox",)), model="new@0", run_id="r2", **common)
    new["processed_at"] = old["processed_at"] + timedelta(seconds=5)
    pq.write_table(rows_to_table([new]), out / "part-a.parquet")  # the newer row in the first file
    pq.write_table(rows_to_table([old]), out / "part-b.parquet")
    fs, root = open_fs(str(out), {})
    assert write_previews(fs, root, 1, uris=[uri]) == 1
    text = " ".join(parse((out / "_previews" / "index.html").read_text()).text)
    assert "fox" in text and "cat" not in text and "new@0" in text


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if found := shutil.which(name):
            return found
    return None


@pytest.mark.skipif(chromium() is None, reason="no chromium binary on PATH (Debian: apt-get install -y chromium)")
def test_index_renders_in_headless_chromium(tmp_path: Path) -> None:
    out, uris = dataset(tmp_path, ["first.png", "a&b <c>.png"])
    fs, root = open_fs(str(out), {})
    assert write_previews(fs, root, 2, uris=uris) == 2
    shot = tmp_path / "shot.png"
    command = [
        str(chromium()),
        "--headless",
        "--no-sandbox",  # CI containers run as root, where the sandbox refuses to start
        "--disable-gpu",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1280,1600",
        f"--screenshot={shot}",
        (out / "_previews" / "index.html").as_uri(),
    ]
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    page = np.asarray(Image.open(shot).convert("RGB"))
    assert page.shape[:2] == (1600, 1280)
    shown = colours_in(page)
    assert len(shown) > 50  # not a blank page
    # Both previews were loaded through their relative links and drawn unscaled: the legend strip's colour
    # and nearly all of a sample of their tinted-noise pixels (colours nothing else on the page has) are there.
    rng = np.random.default_rng(0)
    for uri in uris:
        preview = np.asarray(Image.open(out / "_previews" / preview_name(uri, image_id(uri))).convert("RGB"))
        assert BACKGROUND in shown
        sample = preview[rng.integers(0, 512, 300), rng.integers(0, 683, 300)]
        found = sum(tuple(c) in shown for c in sample.tolist())
        assert found >= 0.95 * len(sample), f"{found} of {len(sample)} preview colours on the page"
