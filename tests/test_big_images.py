"""Bounded memory for big images: banded post-processing equals the whole computation, instance masks packed as
they are made equal the batch-packed ones, Pillow's warnings go to the log, and the memory budget."""

from __future__ import annotations

import io
import logging
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from m2f.model.postprocess import instance_inference, panoptic_inference, upsample_mask_logits
from m2f.model.resize import column_bands, resize_tile
from m2f.pipeline import budget
from m2f.pipeline.compact import compact, keep_instance_mask
from m2f.pipeline.decode import decode_image, decode_resized

OUTPUT = (1500, 2000)  # (H, W): moderately large, so that forced small bands and chunks cut it many ways
SIZES = {"image_sizes": [(40, 56)], "output_sizes": [OUTPUT], "padded_size": (64, 64)}


def logits(q: int = 7, k: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, q, k + 1, generator=g) * 3, torch.randn(1, q, 16, 16, generator=g) * 4


@pytest.mark.parametrize("output_size", [(1500, 2000), (37, 1999), (1001, 63)])
@pytest.mark.parametrize("threads", [1, 2])
def test_a_band_equals_the_columns_of_the_whole_resize(output_size, threads) -> None:
    """To float rounding: with several threads the two are equal bit for bit; aten's single-thread bilinear
    kernel rounds its 2-D blend differently from two 1-D passes (measured: 4e-6 on values of ~20)."""
    planes = torch.randn(3, 40, 56) * 5
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        whole = F.interpolate(planes[None], size=output_size, mode="bilinear", align_corners=False)[0]
        for x0, x1 in column_bands(output_size, 173):
            band = resize_tile(planes, output_size, (x0, x1))
            torch.testing.assert_close(band, whole[:, :, x0:x1], rtol=1e-6, atol=1e-5)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("chunk_size", [1, 2])
def test_banded_panoptic_equals_the_whole_computation(chunk_size) -> None:
    class_logits, mask_logits = logits()
    options = {"is_thing": [True, False, True, False], "object_mask_threshold": 0.0, "overlap_threshold": 0.3}
    (whole,) = panoptic_inference(class_logits, mask_logits, **SIZES, **options, band_width=OUTPUT[1])
    (banded,) = panoptic_inference(class_logits, mask_logits, **SIZES, **options, chunk_size=chunk_size, band_width=300)
    assert len(whole.labels) >= 2  # the case has segments to get wrong
    assert torch.equal(banded.panoptic, whole.panoptic)
    assert torch.equal(banded.labels, whole.labels) and torch.equal(banded.scores, whole.scores)
    # and the straightforward reference: every query's logits at the output size at once
    full = upsample_mask_logits(mask_logits[0], image_size=(40, 56), output_size=OUTPUT, padded_size=(64, 64))
    assert torch.equal(full, resize_tile_all(mask_logits))


def resize_tile_all(mask_logits: torch.Tensor) -> torch.Tensor:
    bands = column_bands(OUTPUT, 300)
    x = F.interpolate(mask_logits, size=(64, 64), mode="bilinear", align_corners=False)[0, :, :40, :56]
    return torch.cat([resize_tile(x, OUTPUT, band) for band in bands], dim=2)


def test_banded_instance_equals_the_whole_computation() -> None:
    class_logits, mask_logits = logits(seed=1)
    (whole,) = instance_inference(class_logits, mask_logits, **SIZES, top_k=6, band_width=OUTPUT[1])
    (banded,) = instance_inference(class_logits, mask_logits, **SIZES, top_k=6, chunk_size=2, band_width=300)
    assert torch.equal(banded.masks, whole.masks) and torch.equal(banded.labels, whole.labels)
    torch.testing.assert_close(banded.scores, whole.scores)  # a band's sums, added: the last bits may differ


def test_instance_masks_packed_as_made_give_the_same_compact_form(monkeypatch) -> None:
    class_logits, mask_logits = logits(seed=2)
    (whole,) = instance_inference(class_logits, mask_logits, **SIZES, top_k=6)
    monkeypatch.setattr("m2f.pipeline.compact.LARGE_PIXELS", 0)  # every mask counts as large
    (packed,) = instance_inference(class_logits, mask_logits, **SIZES, top_k=6, keep_mask=keep_instance_mask)
    a, b = compact("instance", whole, 0.1), compact("instance", packed, 0.1)
    assert len(a.labels) > 0 and b.rle_counts is not None  # crops, and RLEs made as the masks were
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.scores, b.scores)
    assert [r["counts"] for r in a.rles()] == [r["counts"] for r in b.rles()]
    assert np.array_equal(a.masks(), b.masks())
    # and through the compact row and the encode stage
    from m2f.pipeline.handover import compact_row, compact_table, encode_rows

    classes = ([1] * len(a.labels), ["x"] * len(a.labels), [True] * len(a.labels))
    out = [
        encode_rows(
            compact_table([compact_row("u", p, classes, model="m", run_id="r", inference_ms=0.0, source_bytes=1)])
        )
        for p in (a, b)
    ]
    assert out[0]["segments"].to_pylist() == out[1]["segments"].to_pylist()


def test_pillows_warnings_go_to_the_log(caplog, monkeypatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 40x40 = 1600 pixels: above it, below twice it
    buf = io.BytesIO()
    Image.new("1", (40, 40), 1).save(buf, "PNG")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning that reached the caller would fail here
        with caplog.at_level(logging.WARNING, logger="m2f.pipeline.decode"):
            image = decode_image(buf.getvalue())
    assert image.shape == (40, 40, 3) and image.dtype == np.uint8 and (image == 255).all()
    assert any("DecompressionBombWarning" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("mode", ["1", "L", "RGB", "P"])
def test_decoding_copied_by_bands_equals_pillows_conversion(mode, monkeypatch) -> None:
    monkeypatch.setattr("m2f.pipeline.decode.COPY_ROWS_BYTES", 100)  # many bands
    rgb = np.random.default_rng(0).integers(0, 256, (37, 23, 3), dtype=np.uint8)
    picture = Image.fromarray(rgb).convert(mode)
    buf = io.BytesIO()
    picture.save(buf, "PNG")
    assert np.array_equal(decode_image(buf.getvalue()), np.asarray(picture.convert("RGB")))


def test_budget_grows_with_the_image_and_is_capped_by_the_node() -> None:
    small, big = budget.image_cost(640, 480), budget.image_cost(10000, 9990)
    assert small.largest < big.largest
    assert big.postprocess < 10000 * 9990 * 30  # bounded per pixel, not per query
    need = budget.prepare_memory(100_000_000, 256 * 1024**2)
    assert need >= 100_000_000 * 3 + 256 * 1024**2  # at least the decoded array and the reads ahead
    assert budget.prepare_memory(100_000_000, 256 * 1024**2, node_bytes=4 * 1024**3) == 1024**3  # a quarter
    actor = budget.actor_memory(100_000_000, 4, 2 * 1024**3)
    assert actor > budget.actor_memory(1_000_000, 4, 2 * 1024**3) > 2 * 1024**3
    with pytest.raises(ValueError, match="positive"):
        budget.image_cost(0, 10)


@pytest.mark.parametrize("mode", ["1", "L", "RGB", "P", "RGBA"])
@pytest.mark.parametrize("size", [(20, 31), (90, 140), (37, 23)])
def test_decode_resized_equals_decoding_then_resizing(mode, size) -> None:
    from m2f.model.config import PreprocessConfig
    from m2f.model.preprocess import resize_image, resized_size

    rgb = np.random.default_rng(1).integers(0, 256, (37, 23, 4), dtype=np.uint8)
    picture = Image.fromarray(rgb, "RGBA").convert(mode)
    buf = io.BytesIO()
    picture.save(buf, "PNG")
    cfg = PreprocessConfig(min_size=size[0], max_size=size[1])
    source, resized = decode_resized(buf.getvalue(), lambda h, w: resized_size(h, w, cfg))
    assert source == (37, 23)
    assert np.array_equal(resized, resize_image(decode_image(buf.getvalue()), cfg))


def test_preview_png_equals_rendering_the_decoded_image() -> None:
    from pycocotools import mask as mask_utils

    from m2f.pipeline.preview.picture import png_bytes, preview_png, render_preview

    rng = np.random.default_rng(3)
    for height, width in [(300, 200), (1500, 2100)]:
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "PNG")
        mask = np.zeros((height, width), dtype=np.uint8, order="F")
        mask[height // 4 : height // 2, width // 3 :] = 1
        rle = mask_utils.encode(mask)
        segments = [{"id": 1, "label": "x", "score": 0.9, "area": int(mask.sum()), "rle": rle}]
        want = png_bytes(render_preview(decode_image(buf.getvalue()), segments))
        assert preview_png(buf.getvalue(), segments, max_pixels=10**8, size=(height, width)) == want


def test_runs_of_an_id_map_by_blocks_of_columns_equal_the_whole_map() -> None:
    from m2f.pipeline.encode import rles_from_id_map, runs

    rng = np.random.default_rng(4)
    id_map = np.repeat(rng.integers(0, 4, (9, 13)), 3, axis=0).astype(np.uint8)  # runs that cross columns
    id_map[:, 5:7] = 2  # and whole columns of one id, so runs cross block boundaries
    whole, blocks = runs(id_map), runs(id_map, block=id_map.shape[0] * 2)
    assert all(np.array_equal(a, b) for a, b in zip(whole, blocks, strict=True))
    from pycocotools import mask as mask_utils

    for k, rle in enumerate(rles_from_id_map(id_map, 3)):
        assert rle["counts"] == mask_utils.encode(np.asfortranarray((id_map == k + 1).astype(np.uint8)))["counts"]


def test_encode_rows_reads_masks_from_arrow_without_copies_the_same() -> None:
    import pyarrow as pa

    from m2f.pipeline.compact import CompactPrediction
    from m2f.pipeline.handover import compact_row, compact_table, encode_rows

    rows = []
    for i in range(3):
        id_map = np.random.default_rng(i).integers(0, 3, (11, 7)).astype(np.uint8)
        scores = np.array([0.9, 0.8], np.float32)
        prediction = CompactPrediction("panoptic", np.array([0, 1]), scores, 11, 7, id_map=id_map)
        classes = ([1, 2], ["a", "b"], [True, False])
        rows.append(compact_row(f"u{i}", prediction, classes, model="m", run_id="r", inference_ms=1.0, source_bytes=5))
    table = pa.concat_tables([compact_table(rows[:1]), compact_table(rows[1:])])  # two chunks
    as_numpy = {name: np.array(table[name].to_pylist(), dtype=object) for name in table.column_names}
    a, b = encode_rows(table), encode_rows(as_numpy)
    assert a.drop_columns(["processed_at"]).equals(b.drop_columns(["processed_at"]))


def test_build_dataset_reserves_memory_for_the_prepare_tasks_and_the_actors(ray_cluster, tmp_path) -> None:
    import numpy as np

    from m2f.jobs.common.configs import SegmentConfig
    from m2f.jobs.segment.dataflow import MODEL_BYTES, READ_AHEAD_BYTES, build_dataset
    from m2f.jobs.segment.resume import WorkPlan
    from m2f.model.config import PreprocessConfig

    config = SegmentConfig(input=str(tmp_path), output=str(tmp_path / "out"), model="demo", batch_size=2)
    plan = WorkPlan(files=[str(tmp_path / "work.parquet")], pending=np.zeros(0, np.uint64))
    ds = build_dataset(
        config,
        plan,
        weights="demo",
        preprocess=PreprocessConfig(),
        task="panoptic",
        device="cpu",
        run_id="r",
        cluster_cpus=2.0,
    )
    args = {}
    op = ds._logical_plan.dag
    while op is not None:  # the plan's operators, last first; not executed
        args[op.name] = getattr(op, "ray_remote_args", {}) or {}
        op = op.input_dependencies[0] if op.input_dependencies else None
    node = budget.node_memory()
    assert node is not None
    prepare = next(v for k, v in args.items() if "prepare_images" in k)
    actor = next(v for k, v in args.items() if "Segmenter" in k)
    assert prepare["memory"] == budget.prepare_memory(config.max_pixels, READ_AHEAD_BYTES, node)
    assert actor["memory"] == budget.actor_memory(config.max_pixels, 2, MODEL_BYTES, node)
    assert 0 < prepare["memory"] <= node * budget.NODE_SHARE and 0 < actor["memory"] <= node * budget.NODE_SHARE


@pytest.mark.parametrize("mode", ["RGBA", "LA", "I;16", "I", "F"])
def test_conversions_by_bands_equal_the_whole_plane(mode, monkeypatch) -> None:
    rng = np.random.default_rng(5)
    if mode in ("RGBA", "LA"):
        picture = Image.fromarray(rng.integers(0, 256, (37, 23, 4), dtype=np.uint8), "RGBA").convert(mode)
    elif mode == "F":
        values = rng.normal(0, 1000, (37, 23)).astype(np.float32)
        values[3, 4], values[5, 6], values[7, 8] = np.nan, np.inf, -np.inf
        picture = Image.fromarray(values, "F")
    else:
        top = 65535 if mode == "I;16" else 10**7
        picture = Image.fromarray(rng.integers(0, top, (37, 23)).astype(np.uint16 if mode == "I;16" else np.int32))
    buf = io.BytesIO()
    picture.save(buf, "TIFF" if mode in ("I;16", "I", "F") else "PNG")
    whole = decode_image(buf.getvalue())
    monkeypatch.setattr("m2f.pipeline.decode.COPY_ROWS_BYTES", 100)  # a few rows a band
    assert np.array_equal(decode_image(buf.getvalue()), whole)
