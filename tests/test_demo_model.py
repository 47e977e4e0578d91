"""The bundled demo model: present, small, loadable by name, and still segmenting scenes it never saw.

The README records the full figures on 200 held-out scenes; this checks a lower floor on a fresh set
(a seed used nowhere else) in well under a minute, so a regression in the model code, the
pre/post-processing or the file itself fails here.
"""

from __future__ import annotations

import pytest

from m2f import model as m2f
from m2f.jobs.evaluate.quality import score
from m2f.pipeline.training.synthetic import generate

FRESH_SEED = 424242  # never used for training (1), monitoring (500) or the README's held-out set (1000)
# Floors well below the README's figures (see there), so that scene-to-scene variance on 24 images
# cannot fail the test but a broken model or pipeline does.
FLOORS = {"PQ_stuff": 0.9, "PQ": 0.6, "AP": 0.4}


def test_demo_model_is_small_and_loads_by_name() -> None:
    assert m2f.DEMO_MODEL.exists(), "model/assets/demo.safetensors is missing"
    assert m2f.DEMO_MODEL.stat().st_size <= 10 * 1024 * 1024
    net = m2f.load("demo")
    assert net.config.class_names == ("circle", "rectangle", "triangle", "sky", "ground")
    assert not net.training


@pytest.mark.slow
def test_demo_model_meets_floor_on_fresh_scenes(tmp_path, one_thread) -> None:
    generate(str(tmp_path), 24, FRESH_SEED)
    result = score(m2f.load("demo"), str(tmp_path))
    assert result["images"] == 24
    for name, floor in FLOORS.items():
        assert result[name] >= floor, f"{name} {result[name]:.3f} < floor {floor} ({result})"
