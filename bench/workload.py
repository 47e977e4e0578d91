"""What the benchmarks run on: small models (random weights) and synthetic images on any fsspec URI.

Models (`resolve_model`): `demo` (model/assets/demo.safetensors; until it exists, the same architecture with
random weights), `random-demo`, `micro` (a few thousand parameters at 64-128 px: for smoke tests), or any
checkpoint path or URI. Random models get zero post-processing thresholds so that they still produce segments
to encode.
"""

from __future__ import annotations

import posixpath
import tempfile
from pathlib import Path
from typing import Any

import fsspec
import torch


def micro_config() -> Any:
    """A Mask2Former of a few thousand parameters on 64-128 px inputs: the smoke tests' model."""
    from m2f.model.config import DecoderConfig, PixelDecoderConfig, ResNetConfig

    return _synthetic_model(
        "micro-random",
        backbone=ResNetConfig(depths=(1, 1, 1, 1), stem_channels=8, widths=(16, 32, 64, 128), norm="bn"),
        pixel_decoder=PixelDecoderConfig(conv_dim=32, mask_dim=32, num_layers=1, num_heads=4, ffn_dim=64, num_groups=8),
        decoder=DecoderConfig(hidden_dim=32, num_queries=8, num_heads=4, ffn_dim=64, num_layers=2),
        sizes=(64, 128),
    )


def demo_architecture_config() -> Any:
    """The bundled demo model's architecture and classes (`m2f train --arch tiny --image-size 256` on the
    synthetic scenes), for random weights while model/assets/demo.safetensors does not exist."""
    from m2f.model.presets import ARCHITECTURES

    arch = ARCHITECTURES["tiny"]
    parts = {"backbone": arch.backbone, "pixel_decoder": arch.pixel_decoder, "decoder": arch.decoder}
    return _synthetic_model("tiny-random", **parts, sizes=(256, 256))


def _synthetic_model(name: str, *, sizes: tuple[int, int], **parts: Any) -> Any:
    """A ModelConfig with the synthetic scenes' classes, test-time resize `sizes` (min, max) and zero
    thresholds, so that random weights still produce segments to encode."""
    from m2f.model.config import ModelConfig, PostprocessConfig, PreprocessConfig
    from m2f.pipeline.training.synthetic import SYNTHETIC_CATEGORIES

    return ModelConfig(
        name=name,
        num_classes=len(SYNTHETIC_CATEGORIES),
        class_names=tuple(c["name"] for c in SYNTHETIC_CATEGORIES),
        is_thing=tuple(bool(c["isthing"]) for c in SYNTHETIC_CATEGORIES),
        category_ids=tuple(int(c["id"]) for c in SYNTHETIC_CATEGORIES),
        preprocess=PreprocessConfig(min_size=sizes[0], max_size=sizes[1]),
        postprocess=PostprocessConfig(object_mask_threshold=0.0, overlap_threshold=0.0),
        **parts,
    )


def save_random(config: Any, path: Path, seed: int = 0) -> str:
    """`config` with random weights (seeded) saved in the project's format at `path`; returns the path."""
    from m2f.model import build_model, save

    torch.manual_seed(seed)
    save(build_model(config), path)
    return str(path)


def resolve_model(name: str, folder: Path) -> tuple[str, str]:
    """`--model` -> (what to pass as `--model`, a description for the results). Random models go to `folder`."""
    from m2f.model import DEMO_MODEL

    if name == "demo" and DEMO_MODEL.exists():
        return "demo", f"bundled demo model ({DEMO_MODEL.name})"
    if name in ("demo", "random-demo"):
        why = " (model/assets/demo.safetensors does not exist yet)" if name == "demo" else ""
        path = save_random(demo_architecture_config(), folder / "random-demo.safetensors")
        return path, f"demo architecture with random weights{why}"
    if name == "micro":
        return save_random(micro_config(), folder / "micro.safetensors"), "micro model, random weights (smoke size)"
    return name, name


def write_images(
    target: str, n: int, *, seed: int = 0, distinct: int | None = None, storage_options: dict[str, Any] | None = None
) -> None:
    """`n` synthetic scenes as `target/img-NNNNNN.png` (a folder or prefix, any fsspec URI).

    `distinct` scenes (default: n) are drawn with `pipeline.synthetic.generate` and repeated in turn to make up
    `n` files; each file is its own URI and so its own row.
    """
    from m2f.pipeline.training.synthetic import generate

    k = n if distinct is None else max(1, min(n, distinct))
    with tempfile.TemporaryDirectory() as scratch:
        generate(scratch, k, seed)
        scenes = [p.read_bytes() for p in sorted(Path(scratch, "images").glob("*.png"))]
    fs, root = fsspec.core.url_to_fs(target, **(storage_options or {}))
    fs.makedirs(root, exist_ok=True)
    for i in range(n):
        fs.pipe_file(posixpath.join(root, f"img-{i:06d}.png"), scenes[i % k])


def listed_uris(input: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """The image URIs `m2f segment` lists under `input`, in its order."""
    from m2f.pipeline.sources import list_inputs

    return list(list_inputs(input, storage_options or {}).uris())
