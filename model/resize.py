"""The resize chain shared by every post-processing task: network input -> crop -> original size.

Mask logits come out at 1/4 of the padded network input; each image's result is wanted at its original
size. The steps (bilinear to the padded size, crop the resized image, bilinear to the original size) are
detectron2's `sem_seg_postprocess`. At large sizes the upsampled logits of all queries would not fit in
memory, so they are produced a bounded chunk of queries (or classes) at a time: bilinear resizing is
independent per plane, so the outcome equals resizing all at once. Above TILE_ELEMENTS output pixels even
one plane is not made whole: `query_tiles` makes it a band of columns at a time (`resize_tile`), bit for
bit the columns of the whole resize.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

Size = tuple[int, int]

# Float32 elements one resize step may hold (padded plus output planes of a chunk): about 256 MiB.
CHUNK_ELEMENTS = 1 << 26
# Float32 elements of one tile at the output size (a chunk of planes over a band of columns): 32 MiB. An
# output of at most this many pixels is one band, resized in one step as before; a larger one (a 48 or 100
# MP photo) is produced band by band, so no whole plane at the output size is ever held.
TILE_ELEMENTS = 1 << 23


@dataclass(frozen=True)
class Geometry:
    """Sizes of one image along the resize chain."""

    image_size: Size  # (h, w) of the resized image inside the padded input
    output_size: Size  # (H, W) of the original image
    padded_size: Size  # (Hp, Wp) of the network input


def upsample_mask_logits(mask_logits: Tensor, *, image_size: Size, output_size: Size, padded_size: Size) -> Tensor:
    """mask_logits (Q, h, w) -> (Q, H, W): to the padded input, crop the image, to the output size.

    All steps are bilinear with align_corners=False, as detectron2's `sem_seg_postprocess`.
    """
    x = F.interpolate(mask_logits[None], size=padded_size, mode="bilinear", align_corners=False)  # (1, Q, Hp, Wp)
    x = x[:, :, : image_size[0], : image_size[1]]  # (1, Q, h, w)
    if tuple(output_size) == tuple(image_size):
        return x[0]  # a same-size bilinear resize is the identity
    return F.interpolate(x, size=output_size, mode="bilinear", align_corners=False)[0]  # (Q, H, W)


def downsample(x: Tensor, size: Size) -> Tensor:
    """x (..., H, W) -> (..., h, w), equal to bilinear `F.interpolate(align_corners=False)` without antialias.

    When H/h and W/w are whole numbers (the decoder's levels: 1/4 -> 1/8, 1/16, 1/32 of an input padded to a
    multiple of 32), every output sample sits at source position s*i + (s-1)/2: between two source rows
    with weights 1/2 each for an even factor s, on one row for an odd one. Strided slices compute that
    directly; on a CPU, `F.interpolate` of an NCHW map down to a small size took 8-25 ms for
    (1, 256, 128, 128) or (1, 256, 200, 304), this takes 0.1-3 ms (bench/NOTES.md). Other sizes: interpolate.
    """
    H, W = x.shape[-2:]
    h, w = size
    if H % h or W % w:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return _halves(_halves(x, H // h, x.ndim - 2), W // w, x.ndim - 1)


def _halves(x: Tensor, step: int, dim: int) -> Tensor:
    """Every `step`-th sample along `dim` (whose length is a multiple of `step`), taken at the middle of its
    `step` source samples: one sample for an odd step, the mean of the two central ones for an even one."""

    def every(start: int) -> Tensor:
        index: list[slice] = [slice(None)] * x.ndim
        index[dim] = slice(start, None, step)
        return x[tuple(index)]

    if step == 1:
        return x
    if step % 2:
        return every(step // 2)
    return (every(step // 2 - 1) + every(step // 2)) * 0.5


def query_chunks(
    mask_logits: Tensor, queries: Tensor, geom: Geometry, chunk_size: int | None
) -> Iterator[tuple[int, Tensor]]:
    """Yield (offset into `queries`, logits (c, H, W)) for the listed queries, a bounded chunk at a time."""
    if chunk_size is None:
        plane = geom.padded_size[0] * geom.padded_size[1] + geom.output_size[0] * geom.output_size[1]
        chunk_size = max(1, CHUNK_ELEMENTS // plane)
    for start in range(0, queries.numel(), chunk_size):
        picked = mask_logits[queries[start : start + chunk_size]]  # (c, h, w)
        sizes = {"image_size": geom.image_size, "output_size": geom.output_size, "padded_size": geom.padded_size}
        yield start, upsample_mask_logits(picked, **sizes)


def band_width(output_size: Size, tile_elements: int = TILE_ELEMENTS) -> int:
    """Columns per band: a band of all H rows holds at most `tile_elements` pixels (at least one column)."""
    h, w = output_size
    return max(1, min(w, tile_elements // h))


def column_bands(output_size: Size, width: int | None = None) -> list[tuple[int, int]]:
    """[(x0, x1), ...] covering the W columns of `output_size` in bands of `width` (None: `band_width`)."""
    w = output_size[1]
    width = band_width(output_size) if width is None else width
    if width < 1:
        raise ValueError(f"band width must be >= 1, got {width}")
    return [(x0, min(w, x0 + width)) for x0 in range(0, w, width)]


def resize_tile(planes: Tensor, output_size: Size, band: tuple[int, int] | None) -> Tensor:
    """planes (c, h, w) -> columns `band` (x0, x1) of their bilinear resize to `output_size`, (c, H, x1 - x0);
    None: the whole resize (c, H, W).

    A band is resized along W over the full width (every output column from its own source position, as in
    the whole resize), its columns are taken, and they are resized along H. PyTorch's bilinear kernel
    interpolates along W first and then along H, so a band equals those columns of the whole resize to float
    rounding: bit for bit on several threads, within an ulp or two on one (aten's single-thread kernel blends
    in 2-D); tests/test_big_images.py checks both.
    """
    h, w = planes.shape[-2:]
    if band is None:
        if (h, w) == tuple(output_size):
            return planes  # a same-size bilinear resize is the identity
        return F.interpolate(planes[None], size=output_size, mode="bilinear", align_corners=False)[0]
    x0, x1 = band
    if w != output_size[1]:
        planes = F.interpolate(planes[None], size=(h, output_size[1]), mode="bilinear", align_corners=False)[0]
    tile = planes[:, :, x0:x1]  # (c, h, band)
    if h != output_size[0]:
        tile = F.interpolate(tile[None], size=(output_size[0], x1 - x0), mode="bilinear", align_corners=False)[0]
    return tile  # (c, H, band)


def tile_chunk(geom: Geometry, bands: Sequence[tuple[int, int]], chunk_size: int | None) -> int:
    """Queries per step: `chunk_size`, or as many as CHUNK_ELEMENTS (one band: the padded and output planes,
    as before) or TILE_ELEMENTS (several: a band of the output) allow."""
    if chunk_size is not None:
        return chunk_size
    if len(bands) == 1:
        plane = geom.padded_size[0] * geom.padded_size[1] + geom.output_size[0] * geom.output_size[1]
        return max(1, CHUNK_ELEMENTS // plane)
    widest = max(x1 - x0 for x0, x1 in bands)
    return max(1, TILE_ELEMENTS // (geom.output_size[0] * widest))


def query_tiles(
    mask_logits: Tensor,
    queries: Tensor,
    geom: Geometry,
    chunk_size: int | None,
    bands: Sequence[tuple[int, int]],
) -> Iterator[tuple[int, int, Tensor]]:
    """Yield (band index, offset into `queries`, logits (c, H, x1 - x0)) for the listed queries: band after
    band, a chunk of queries at a time, each the columns of `upsample_mask_logits` in that band.

    With one band this is `query_chunks`. With several, the network-size steps (to the padded input, crop)
    are redone for every band: they cost a fraction of the band's tile, and no plane at the output size is
    ever whole.
    """
    step = tile_chunk(geom, bands, chunk_size)
    whole = len(bands) == 1 and bands[0] == (0, geom.output_size[1])
    for b, band in enumerate(bands):
        for start in range(0, queries.numel(), step):
            picked = mask_logits[queries[start : start + step]]  # (c, h/4, w/4)
            x = F.interpolate(picked[None], size=geom.padded_size, mode="bilinear", align_corners=False)[0]
            x = x[:, : geom.image_size[0], : geom.image_size[1]]  # (c, h, w)
            yield b, start, resize_tile(x, geom.output_size, None if whole else band)


def geometries(
    class_logits: Tensor,
    mask_logits: Tensor,
    image_sizes: Sequence[Size],
    output_sizes: Sequence[Size],
    padded_size: Size | None,
    chunk_size: int | None,
) -> list[Geometry]:
    """Check the batch and return each image's resize geometry."""
    if class_logits.ndim != 3 or mask_logits.ndim != 4:
        raise ValueError(
            f"expected class_logits (B, Q, K+1) and mask_logits (B, Q, h, w), "
            f"got {tuple(class_logits.shape)} and {tuple(mask_logits.shape)}"
        )
    if class_logits.shape[:2] != mask_logits.shape[:2]:
        raise ValueError(f"batch/query sizes differ: {tuple(class_logits.shape)} vs {tuple(mask_logits.shape)}")
    if class_logits.shape[-1] < 2:
        raise ValueError(f"class_logits needs K+1 >= 2 entries, got {class_logits.shape[-1]}")
    b = class_logits.shape[0]
    if len(image_sizes) != b or len(output_sizes) != b:
        raise ValueError(f"batch of {b} with {len(image_sizes)} image sizes and {len(output_sizes)} output sizes")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if padded_size is None:
        padded = (4 * mask_logits.shape[-2], 4 * mask_logits.shape[-1])  # the masks' stride is 4
    else:
        padded = (int(padded_size[0]), int(padded_size[1]))
    geoms = []
    for image_size, output_size in zip(image_sizes, output_sizes, strict=True):
        ih, iw = image_size
        if not (0 < ih <= padded[0] and 0 < iw <= padded[1]):
            raise ValueError(f"image size {tuple(image_size)} does not fit in the padded size {padded}")
        if min(output_size) <= 0:
            raise ValueError(f"output size must be positive, got {tuple(output_size)}")
        geoms.append(Geometry((int(ih), int(iw)), (int(output_size[0]), int(output_size[1])), padded))
    return geoms


def resized_argmax(semseg: Tensor, size: Size, chunk_size: int | None) -> tuple[Tensor, Tensor, Tensor]:
    """semseg (K, h, w) resized bilinearly to `size` (H, W) a chunk of classes at a time, never whole.

    Returns the argmax class (H*W,) (ties -> lowest class), its value (H*W,) and the sum over classes (H*W,).
    """
    k, ih, iw = semseg.shape
    n = size[0] * size[1]
    if chunk_size is None:
        chunk_size = max(1, CHUNK_ELEMENTS // (ih * iw + n))
    label_map = torch.zeros(n, dtype=torch.int64, device=semseg.device)
    best = torch.full((n,), -torch.inf, dtype=torch.float32, device=semseg.device)
    total = torch.zeros(n, dtype=torch.float32, device=semseg.device)
    for start in range(0, k, chunk_size):
        part = semseg[None, start : start + chunk_size]  # (1, c, h, w)
        if (ih, iw) != tuple(size):
            part = F.interpolate(part, size=size, mode="bilinear", align_corners=False)  # (1, c, H, W)
        part = part[0].flatten(1)  # (c, H*W)
        total += part.sum(0)
        arg = part.argmax(0)  # (H*W,), ties -> lowest class of the chunk
        top = part.gather(0, arg[None])[0]
        better = top > best  # strict: an earlier chunk keeps a tie
        best = torch.where(better, top, best)
        label_map = torch.where(better, arg + start, label_map)
    return label_map, best, total
