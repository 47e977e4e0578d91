"""The stages around the model, without Ray: `prepare_images` (read, decode, resize), the `Segmenter`
actor class (grouping by padded size, error rows passed through) and `encode_rows` after it (rows valid
per OUTPUT_SCHEMA).

`tiny_model_file` is shared with the job tests: a random model small enough to run in milliseconds.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from m2f import model
from m2f.model import ModelConfig, build_model, save
from m2f.model.config import DecoderConfig, PixelDecoderConfig, PostprocessConfig, PreprocessConfig, ResNetConfig
from m2f.model.preprocess import padded_size, resize_image, resized_shape
from m2f.pipeline.decode import decode_image
from m2f.pipeline.handover import COMPACT_SCHEMA, encode_rows
from m2f.pipeline.infer import WORK_SCHEMA, Segmenter, model_label, prepare_images
from m2f.pipeline.predictor import Predictor, check_precision
from m2f.pipeline.schema import OUTPUT_SCHEMA, image_id
from m2f.pipeline.secrets import scrub, secret_values
from tests.conftest import TEST_SECRETS

CLASS_NAMES = ("sky", "ground", "blob")


def tiny_config(task: str = "semantic") -> ModelConfig:
    """A Mask2Former of a few thousand parameters. Panoptic thresholds are zero so that a random model
    still yields segments to check."""
    return ModelConfig(
        name="tiny",
        backbone=ResNetConfig(depths=(1, 1, 1, 1), stem_channels=8, widths=(16, 32, 64, 128), norm="bn"),
        num_classes=len(CLASS_NAMES),
        class_names=CLASS_NAMES,
        is_thing=(False, False, True),
        task=task,
        pixel_decoder=PixelDecoderConfig(conv_dim=32, mask_dim=32, num_layers=1, num_heads=4, ffn_dim=64, num_groups=8),
        decoder=DecoderConfig(hidden_dim=32, num_queries=8, num_heads=4, ffn_dim=64, num_layers=2),
        preprocess=PreprocessConfig(min_size=64, max_size=128),
        postprocess=PostprocessConfig(object_mask_threshold=0.0, overlap_threshold=0.0),
        category_ids=(7, 8, 9),
    )


def tiny_model_file(path: Path, task: str = "semantic", seed: int = 0) -> str:
    torch.manual_seed(seed)
    save(build_model(tiny_config(task)), path)
    return str(path)


def png(width: int, height: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    return tiny_model_file(tmp_path_factory.mktemp("model") / "tiny.safetensors")


@pytest.fixture(scope="module")
def segmenter(model_path: str) -> Segmenter:
    return Segmenter(model_path, run_id="run-1", task="semantic", batch_size=2)


def as_numpy_batch(table: pa.Table) -> dict[str, np.ndarray]:
    """What Ray's "numpy" batch format hands the actor."""
    return {name: np.array(table[name].to_pylist(), dtype=object) for name in table.column_names}


@pytest.fixture
def images(tmp_path: Path) -> dict[str, str]:
    """Local files: four images of three padded sizes, one missing file, one text file named .png."""
    sizes = {"a": (40, 30), "b": (60, 45), "c": (30, 40), "d": (100, 20)}
    paths = {}
    for name, (w, h) in sizes.items():
        paths[name] = str(tmp_path / f"{name}.png")
        Path(paths[name]).write_bytes(png(w, h, seed=len(paths)))
    paths["missing"] = str(tmp_path / "missing.png")
    paths["text"] = str(tmp_path / "text.png")
    Path(paths["text"]).write_text("not an image")
    return paths


def prepared(uris: list[str]) -> pa.Table:
    return prepare_images({"image_uri": uris}, preprocess=tiny_config().preprocess, max_pixels=10**8)


def test_prepare_decodes_resizes_and_reports_errors(images: dict[str, str]) -> None:
    table = prepared(list(images.values()))
    assert table.schema == WORK_SCHEMA
    rows = {r["image_uri"]: r for r in table.to_pylist()}
    assert list(rows) == list(images.values())  # one row per input, in order
    cfg = tiny_config().preprocess
    for name in "abcd":
        row = rows[images[name]]
        original = decode_image(Path(images[name]).read_bytes())
        h, w = resized_shape(*original.shape[:2], cfg.min_size, cfg.max_size)
        assert row["status"] == "ok" and row["error"] == ""
        assert (row["width"], row["height"]) == (original.shape[1], original.shape[0])
        assert (row["image_height"], row["image_width"]) == (h, w)
        assert row["source_bytes"] == Path(images[name]).stat().st_size
        pixels = np.frombuffer(row["image"], np.uint8).reshape(h, w, 3)
        np.testing.assert_array_equal(pixels, resize_image(original, cfg))
    assert rows[images["missing"]]["status"] == "error"
    assert rows[images["missing"]]["error"] == "unreadable: file not found"
    assert rows[images["missing"]]["source_bytes"] == -1
    assert rows[images["text"]]["error"].startswith("not an image")
    assert rows[images["text"]]["source_bytes"] == len("not an image")


def test_segmenter_rows_follow_the_schema_and_input_order(segmenter: Segmenter, images: dict[str, str]) -> None:
    compact = segmenter(as_numpy_batch(prepared(list(images.values()))))
    assert compact.schema == COMPACT_SCHEMA
    out = encode_rows(compact)
    assert out.schema == OUTPUT_SCHEMA
    rows = out.to_pylist()
    assert [r["image_uri"] for r in rows] == list(images.values())
    assert [r["image_id"] for r in rows] == [image_id(u) for u in images.values()]
    assert {r["model"] for r in rows} == {model_label("tiny", segmenter.model.checkpoint_sha256)}
    assert {r["run_id"] for r in rows} == {"run-1"} and {r["task"] for r in rows} == {"semantic"}
    for row in rows[:4]:
        assert row["status"] == "ok" and row["error"] is None and row["inference_ms"] > 0
        h, w = row["height"], row["width"]
        masks = [mask_utils.decode({**s["rle"], "counts": s["rle"]["counts"].encode()}) for s in row["segments"]]
        assert all(m.shape == (h, w) for m in masks)
        np.testing.assert_array_equal(np.sum(masks, axis=0), np.ones((h, w)))  # semantic: a partition
        assert row["segment_count"] == len(row["segments"]) >= 1
        assert {s["category_id"] for s in row["segments"]} <= {7, 8, 9}
        assert sum(f["fraction"] for f in row["class_fractions"]) == pytest.approx(1.0)
    # Error rows keep the prepare stage's reason and byte count.
    missing, text = rows[4], rows[5]
    assert missing["status"] == "error" and missing["error"] == "unreadable: file not found"
    assert missing["source_bytes"] is None and missing["segments"] is None and missing["width"] is None
    assert text["status"] == "error" and text["error"].startswith("not an image") and text["source_bytes"] == 12


def test_forward_passes_group_equal_padded_sizes(
    segmenter: Segmenter, images: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    batch = as_numpy_batch(prepared([images[k] for k in ("a", "c", "b", "a", "d", "b", "a")]))
    shapes: list[tuple[int, ...]] = []
    forward = segmenter.model.forward
    monkeypatch.setattr(segmenter.model, "forward", lambda x: (shapes.append(tuple(x.shape)), forward(x))[1])
    rows = encode_rows(segmenter(batch)).to_pylist()
    assert [r["status"] for r in rows] == ["ok"] * 7
    # a and b share a padded size (64x85 -> 64x96); c is 85x64 -> 96x64; d is 26x128 -> 32x128.
    sizes = [(int(h), int(w)) for h, w in zip(batch["image_height"], batch["image_width"], strict=True)]
    padded = [padded_size(h, w, 32) for h, w in sizes]
    assert padded == [(64, 96), (96, 64), (64, 96), (64, 96), (32, 128), (64, 96), (64, 96)]
    assert shapes == [(2, 3, 64, 96), (2, 3, 64, 96), (1, 3, 64, 96), (1, 3, 96, 64), (1, 3, 32, 128)]
    # Batched forward passes give the per-image answer (equal padding, eval-mode BatchNorm), up to fp32
    # rounding: oneDNN may sum in another order for another batch size.
    alone = encode_rows(Segmenter(segmenter.model_uri, run_id="run-1", task="semantic", batch_size=1)(batch))
    alone = alone.to_pylist()
    for grouped, single in zip(rows, alone, strict=True):
        assert [s["rle"] for s in grouped["segments"]] == [s["rle"] for s in single["segments"]]
        np.testing.assert_allclose(
            [s["score"] for s in grouped["segments"]], [s["score"] for s in single["segments"]], rtol=1e-5
        )


def test_a_failing_group_is_retried_image_by_image(
    segmenter: Segmenter, images: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    batch = as_numpy_batch(prepared([images[k] for k in ("a", "b", "d")]))
    forward = segmenter.model.forward

    def fragile(x: torch.Tensor):
        if x.shape[0] > 1:
            raise RuntimeError("CUDA out of memory (pretend)")
        if x.shape[-1] == 128:  # image d alone still fails
            raise RuntimeError("kernel exploded")
        return forward(x)

    monkeypatch.setattr(segmenter.model, "forward", fragile)
    rows = encode_rows(segmenter(batch)).to_pylist()
    assert [r["status"] for r in rows] == ["ok", "ok", "error"]
    assert rows[2]["error"] == "inference failed: RuntimeError: kernel exploded"


@pytest.mark.parametrize("task", ["instance", "panoptic"])
def test_instance_and_panoptic_rows(model_path: str, images: dict[str, str], task: str) -> None:
    batch = as_numpy_batch(prepared([images[k] for k in "abcd"]))
    rows = encode_rows(Segmenter(model_path, run_id="r", task=task, batch_size=4)(batch)).to_pylist()
    assert any(r["segment_count"] for r in rows)
    for row in rows:
        assert row["status"] == "ok" and row["task"] == task
        masks = [mask_utils.decode({**s["rle"], "counts": s["rle"]["counts"].encode()}) for s in row["segments"]]
        assert all(m.shape == (row["height"], row["width"]) for m in masks)
        if task == "panoptic" and masks:
            assert np.sum(masks, axis=0).max() <= 1  # panoptic segments never overlap
        if task == "instance":
            scores = [s["score"] for s in row["segments"]]
            assert scores == sorted(scores, reverse=True)


def test_score_threshold_drops_low_segments(model_path: str, images: dict[str, str]) -> None:
    batch = as_numpy_batch(prepared([images[k] for k in "ab"]))
    everything = encode_rows(Segmenter(model_path, run_id="r", task="instance")(batch)).to_pylist()
    scores = sorted(s["score"] for r in everything for s in r["segments"])
    cut = scores[len(scores) // 2]
    kept = encode_rows(Segmenter(model_path, run_id="r", task="instance", score_threshold=cut)(batch)).to_pylist()
    kept_scores = [s["score"] for r in kept for s in r["segments"]]
    assert kept_scores and min(kept_scores) >= cut
    assert len(kept_scores) == sum(s >= cut for s in scores)


def test_the_checkpoint_task_is_the_default(tmp_path: Path, images: dict[str, str]) -> None:
    path = tiny_model_file(tmp_path / "panoptic.safetensors", task="panoptic")
    rows = encode_rows(Segmenter(path, run_id="r")(as_numpy_batch(prepared([images["a"]])))).to_pylist()
    assert rows[0]["task"] == "panoptic"


@pytest.mark.parametrize("task", ["semantic", "instance", "panoptic"])
def test_predictor_on_one_image_gives_the_segmenters_segments(
    model_path: str, images: dict[str, str], task: str
) -> None:
    """The Python API (`Predictor(net)(image)`) and the job's actor run one recipe: same segments, same order."""
    rows = encode_rows(Segmenter(model_path, run_id="r", task=task)(as_numpy_batch(prepared([images["b"]]))))
    rows = rows.to_pylist()
    predict = Predictor(model.load(model_path), task=task)
    segments = predict(decode_image(Path(images["b"]).read_bytes()))
    assert segments and len(segments) == rows[0]["segment_count"]
    for mine, theirs in zip(segments, rows[0]["segments"], strict=True):
        assert (mine["rle"], mine["category_id"], mine["label"]) == (
            theirs["rle"],
            theirs["category_id"],
            theirs["label"],
        )
        assert mine["score"] == pytest.approx(theirs["score"], rel=1e-6)
    with pytest.raises(ValueError, match="task must be one of"):
        Predictor(predict.net, task="depth")


def test_predictor_load_takes_a_pil_image_upright_as_the_job_reads_files(
    model_path: str, images: dict[str, str], tmp_path: Path
) -> None:
    """`Predictor.load(uri)(pil_image)`: the checkpoint's task, the job's default threshold, and a PIL image
    turned upright by its EXIF orientation, as `m2f segment` reads the file."""
    data = Path(images["b"]).read_bytes()
    upright = decode_image(data)
    rotated = tmp_path / "rotated.jpg"  # stored sideways, with the tag that says so (6: rotate 90 clockwise)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.ascontiguousarray(np.rot90(upright, 1))).save(rotated, exif=exif, quality=100)
    predict = Predictor.load(model_path, task="instance")
    assert predict.score_threshold == 0.5 and Predictor.load(model_path).score_threshold == 0.0
    from_file = Predictor.load(model_path)(decode_image(rotated.read_bytes()))
    from_pil = Predictor.load(model_path)(Image.open(rotated))
    assert from_pil == from_file and from_pil  # the same pixels, upright, the same segments
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8 RGB"):
        predict(upright.astype(np.float32))


def test_bad_settings_are_value_errors(model_path: str) -> None:
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        Segmenter(model_path, run_id="r", precision="fp16")
    with pytest.raises(ValueError, match="precision must be one of"):
        Segmenter(model_path, run_id="r", precision="int8")


def test_the_one_precision_rule() -> None:
    for precision in ("fp32", "bf16", "fp16"):
        check_precision(precision, "cuda")
        check_precision(precision, None)  # the device not decided yet: only the name is checked
    check_precision("bf16", "cpu")
    for device_type in ("cpu", "mps"):
        with pytest.raises(ValueError, match="precision fp16 needs a GPU; use bf16 or fp32 on CPU"):
            check_precision("fp16", device_type)
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, fp16, got 'int8'"):
        check_precision("int8", None)


def test_bf16_autocast_runs_on_cpu(model_path: str, images: dict[str, str]) -> None:
    rows = encode_rows(Segmenter(model_path, run_id="r", precision="bf16")(as_numpy_batch(prepared([images["a"]]))))
    assert rows.to_pylist()[0]["status"] == "ok"


def test_secrets_are_scrubbed_from_messages(monkeypatch: pytest.MonkeyPatch) -> None:
    key, secret = TEST_SECRETS
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    options = {"key": key, "client_kwargs": {"endpoint_url": "http://h"}, "config_kwargs": {"token": ["tok-123"]}}
    found = secret_values(options)
    assert key in found and secret in found and "tok-123" in found and "http://h" not in found
    message = f"denied for {key} with {secret} and tok-123 at https://user:pw@host/x"
    clean = scrub(message, found)
    assert key not in clean and secret not in clean and "tok-123" not in clean and "pw@" not in clean
