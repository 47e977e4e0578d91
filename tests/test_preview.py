"""Overlay previews: the tint lands exactly on a segment's pixels, in its colour, labels on top, and
`write_previews` picks the same rows whatever the file layout."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.encode import encode_segments, image_stats
from pipeline.preview import render_overlay, render_preview, segment_colour, write_previews
from pipeline.schema import error_row, image_id, ok_row, rows_to_table
from pipeline.storage import open_fs


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


def segments_of(masks: np.ndarray, scores: list[float]) -> list[dict]:
    labels = np.arange(len(masks)) % 2
    return encode_segments(masks, labels, np.array(scores), class_names=("cat", "dog"), is_thing=(True, True))


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
    picture = np.asarray(render_preview(image, segments, alpha=0.5, draw_labels=False))
    rect, disc = masks
    assert picture.shape == image.shape
    np.testing.assert_array_equal(picture[rect], blend(image[rect], segment_colour(1), 0.5))
    np.testing.assert_array_equal(picture[disc & ~rect], blend(image[disc & ~rect], segment_colour(2), 0.5))
    np.testing.assert_array_equal(picture[~(rect | disc)], image[~(rect | disc)])


def test_labels_are_drawn_inside_their_segment() -> None:
    image = np.full((64, 96, 3), 128, np.uint8)
    mask = np.zeros((1, 64, 96), bool)
    mask[0, 16:48, 24:72] = True
    plain = np.asarray(render_preview(image, segments_of(mask, [0.5]), draw_labels=False))
    labelled = np.asarray(render_preview(image, segments_of(mask, [0.5]), draw_labels=True))
    changed = (plain != labelled).any(axis=2)
    assert changed.any()
    ys, xs = np.nonzero(changed)
    assert 16 <= ys.mean() < 48 and 24 <= xs.mean() < 72  # the text box sits on the segment


def test_large_images_are_scaled_down() -> None:
    image = np.zeros((300, 2000, 3), np.uint8)
    mask = np.zeros((1, 300, 2000), bool)
    mask[0, :, :1000] = True
    picture = render_preview(image, segments_of(mask, [1.0]), max_side=500, draw_labels=False)
    assert picture.size == (500, 75)
    pixels = np.asarray(picture)
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


def test_write_previews_picks_the_smallest_ok_image_ids(tmp_path: Path) -> None:
    image, masks = scene()
    uris = []
    for i in range(5):
        path = tmp_path / "images" / f"img{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(np.roll(image, i, axis=1)).save(path)
        uris.append(str(path))
    common = {"task": "instance", "model": "tiny@0", "run_id": "r"}
    segments = segments_of(masks, [0.9, 0.4])
    stats = image_stats(segments, 24, 32)
    rows = [ok_row(u, width=32, height=24, segments=segments, stats=stats, inference_ms=1.0, **common) for u in uris]
    rows.append(error_row(str(tmp_path / "broken.png"), "not an image", **common))
    out = tmp_path / "out"
    out.mkdir()
    # Two part files, in an order unrelated to the image ids.
    pq.write_table(rows_to_table(rows[::2]), out / "part-b.parquet")
    pq.write_table(rows_to_table(rows[1::2]), out / "part-a.parquet")
    fs, root = open_fs(str(out), {})
    assert write_previews(fs, root, 3) == 3
    expected = sorted(image_id(u) for u in uris)[:3]
    written = sorted(p.stem for p in (out / "_previews").glob("*.png"))
    assert written == expected
    picture = np.asarray(Image.open(io.BytesIO((out / "_previews" / f"{expected[0]}.png").read_bytes())))
    assert picture.shape == (24, 32, 3)
    assert write_previews(fs, root, 50) == 5  # never more than the ok rows
