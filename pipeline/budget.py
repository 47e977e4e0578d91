"""Memory per image, as code: what a W x H image costs in each stage, and the Ray reservations that follow.

The figures are the bounds the implementation keeps, per pixel of the original image plus fixed amounts:

- decode (a prepare task, `decode.decode_resized`): Pillow's decoded image, a converted copy for modes other
  than RGB and grey, resized as it is (`decode.DECODE_BYTES_PER_PIXEL`, the costliest mode measured);
- post-processing (the model actor): an id map of the won pixels and the compact id map (2 bytes each at
  most, up to 32 767 segments), or one instance mask at a time (1 byte) and, up to LARGE_PIXELS, the packed
  crops (1/8 byte per kept mask; a larger image's masks become COCO RLEs as they are made, kilobytes for
  shapes); plus the tiles of `model.resize` (TILE_ELEMENTS float32, a dozen of them and their int and bool
  companions alive in a band's step) and the network-size planes of a chunk (CHUNK_ELEMENTS float32);
- encoding (an encode task): the compact row, read in place from Arrow, a column-major copy of a block
  of columns and the runs (a few bytes a pixel of an id map at most), or one unpacked crop at a time
  (instance RLEs cost per run: R50's 88 ragged random masks of a 48 MP image measured 207 MB).

`prepare_memory` and `actor_memory` turn them into the `memory=` requests of `jobs.segment.dataflow.build_dataset`,
capped to a share of the node's memory: Ray never grants a request larger than a node, and a task or actor
it cannot place waits for ever, so on a small machine (a 2-core, 24 GB CI runner) the reservation shrinks
to what the node can give and the bound becomes the scheduler's best effort.
"""

from __future__ import annotations

from dataclasses import dataclass

from m2f.model.resize import CHUNK_ELEMENTS, TILE_ELEMENTS
from m2f.pipeline.compact import LARGE_PIXELS
from m2f.pipeline.decode import DECODE_BYTES_PER_PIXEL

ID_MAP_BYTES_PER_PIXEL = 2  # int16: up to 32 767 segments (more would take 4)
POSTPROCESS_BYTES_PER_PIXEL = 2 * ID_MAP_BYTES_PER_PIXEL + 1  # won-pixel map, compact id map, one instance mask
ENCODE_BYTES_PER_PIXEL = 3 * ID_MAP_BYTES_PER_PIXEL  # the row's map, a block's copy and the runs
TILE_COPIES = 12  # float32 tiles (and their int and bool companions) alive at once in a band's step
NODE_SHARE = 0.25  # at most this share of the node's memory is reserved for one task or actor
MB = 1024**2


@dataclass(frozen=True)
class ImageCost:
    """Bytes one image of W x H costs in each stage, above the process's idle state."""

    decode: int  # a prepare task: decode and resize
    postprocess: int  # the model actor, after the forward pass
    encode: int  # an encode task

    @property
    def largest(self) -> int:
        return max(self.decode, self.postprocess, self.encode)


def image_cost(width: int, height: int, *, instance_masks: int = 100) -> ImageCost:
    """What a `width` x `height` image costs per stage; `instance_masks` bounds the packed crops (top-k)."""
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    pixels = width * height
    tiles = TILE_COPIES * TILE_ELEMENTS * 4 + CHUNK_ELEMENTS * 4  # a band's steps, the network-size chunk
    crops = instance_masks * -(-min(pixels, LARGE_PIXELS) // 8)  # packed crops; a larger image's masks are RLEs
    return ImageCost(
        decode=pixels * DECODE_BYTES_PER_PIXEL,
        postprocess=pixels * POSTPROCESS_BYTES_PER_PIXEL + min(tiles, pixels * TILE_COPIES * 4) + crops,
        encode=pixels * ENCODE_BYTES_PER_PIXEL + crops,
    )


def prepare_memory(max_pixels: int, read_bytes: int, node_bytes: int | None = None) -> int:
    """A prepare task's reservation: one decode at `max_pixels` (the task decodes its images one at a time)
    plus `read_bytes`, what its concurrent reads may hold; capped to NODE_SHARE of `node_bytes`."""
    side = max(1, int(max_pixels**0.5))
    need = image_cost(side, max(1, max_pixels // side)).decode + read_bytes
    return _capped(need, node_bytes)


def actor_memory(max_pixels: int, batch_size: int, model_bytes: int, node_bytes: int | None = None) -> int:
    """The model actor's reservation: `batch_size` images at `max_pixels` post-processed (one after another,
    but their compact rows wait together) plus the model; capped to NODE_SHARE of `node_bytes`."""
    side = max(1, int(max_pixels**0.5))
    cost = image_cost(side, max(1, max_pixels // side))
    need = cost.postprocess + (batch_size - 1) * max_pixels * ID_MAP_BYTES_PER_PIXEL + model_bytes
    return _capped(need, node_bytes)


def _capped(need: int, node_bytes: int | None) -> int:
    if node_bytes is None:
        return need
    return max(64 * MB, min(need, int(node_bytes * NODE_SHARE)))


def node_memory() -> int | None:
    """The smallest alive node's memory as Ray reports it (bytes), None when Ray does not say."""
    try:
        import ray

        sizes = [n["Resources"].get("memory", 0) for n in ray.nodes() if n.get("Alive")]
    except Exception:
        return None
    sizes = [s for s in sizes if s > 0]
    return int(min(sizes)) if sizes else None
