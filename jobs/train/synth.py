"""`m2f synth`: synthetic scenes (sky, ground, circles, rectangles, triangles) in the COCO formats `m2f train`
and `m2f evaluate` read; the generator is pipeline/training/synthetic.py."""

from __future__ import annotations

from m2f.jobs.common.console import Console
from m2f.pipeline.storage import Storage


def run(output: str, n: int, seed: int, *, storage: Storage) -> int:
    """Write `n` scenes from `seed` under `output`, say what was written; returns the exit code (0)."""
    from m2f.pipeline.training.synthetic import generate

    done = generate(output, n, seed, storage=storage)
    counts = f"{done['num_images']} images ({done['num_segments']} segments, {done['num_things']} things)"
    Console().line(f"wrote {counts} to {output}: images/, panoptic.json + panoptic/, instances.json, semantic/")
    return 0
