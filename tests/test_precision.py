"""Mixed precision on CPU: a bf16 autocast forward stays close to fp32, and the sensitive parts stay fp32."""

from __future__ import annotations

import pytest
import torch

from m2f import model
from m2f.model import deformable_attention, pixel_decoder, position, transformer_decoder
from tests.hf_models import tiny_hf_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["swin", "resnet"])
def loaded(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"hf_{request.param}")
    tiny_hf_model(request.param).save_pretrained(path)
    return model.load(str(path))


def forward(m: model.Mask2Former, x: torch.Tensor, bf16: bool) -> model.Mask2FormerOutput:
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return m(x)


def test_bf16_autocast_is_close_to_fp32(loaded):
    torch.manual_seed(3)
    x = torch.randn(2, 3, 96, 128)
    full, low = forward(loaded, x, bf16=False), forward(loaded, x, bf16=True)
    assert full.mask_logits.dtype == torch.float32 and low.mask_logits.dtype == torch.bfloat16  # autocast is on
    for name in ("class_logits", "mask_logits"):
        a, b = getattr(full, name), getattr(low, name).float()
        assert torch.isfinite(b).all()
        # bf16 keeps 8 bits of mantissa: errors of a few percent of the logits' spread, never more
        assert (a - b).abs().mean() < 0.05 * a.std(), name
        assert (a - b).abs().max() < 0.75 * a.std(), name
    classes = full.class_logits.argmax(-1) == low.class_logits.argmax(-1)
    assert classes.float().mean() >= 0.95
    signs = (full.mask_logits > 0) == (low.mask_logits > 0)
    assert signs.float().mean() >= 0.95
    assert signs[full.mask_logits.abs() > 0.1].all()  # every pixel with a clear fp32 decision keeps it


def test_positions_and_sampling_locations_stay_fp32_under_autocast(loaded, monkeypatch):
    seen: dict[str, list] = {"pos": [], "locations": [], "weights": [], "autocast": []}

    def record_position(fn):
        def wrapper(*args, **kwargs):
            out = fn(*args, **kwargs)
            seen["pos"].append(out.dtype)
            return out

        return wrapper

    sample = deformable_attention.sample_pixels

    def record_sample(value, shapes, pixels, weights):
        seen["locations"].append({t.dtype for level in pixels for t in level})
        seen["weights"].append(weights.dtype)
        seen["autocast"].append(torch.is_autocast_enabled("cpu"))
        return sample(value, shapes, pixels, weights)

    position._CACHE.clear()  # build the encodings under autocast, not from an fp32 cache
    monkeypatch.setattr(pixel_decoder, "sine_position_encoding", record_position(position.sine_position_encoding))
    monkeypatch.setattr(transformer_decoder, "sine_position_encoding", record_position(position.sine_position_encoding))
    monkeypatch.setattr(deformable_attention, "sample_pixels", record_sample)
    out = forward(loaded, torch.randn(1, 3, 64, 96), bf16=True)
    assert out.mask_logits.dtype == torch.bfloat16
    assert len(seen["pos"]) == 6  # three levels in the pixel decoder, three in the transformer decoder
    assert set(seen["pos"]) == {torch.float32}
    assert len(seen["locations"]) == loaded.config.pixel_decoder.num_layers
    assert set.union(*seen["locations"]) == set(seen["weights"]) == {torch.float32}
    assert not any(seen["autocast"])  # the sampling runs with autocast off


def test_position_encoding_is_fp32_when_built_under_autocast():
    position._CACHE.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pos = position.sine_position_encoding(5, 7, 64, torch.device("cpu"))
    assert pos.dtype == torch.float32 and pos.shape == (64, 5, 7)
    position._CACHE.clear()
    assert torch.equal(pos, position.sine_position_encoding(5, 7, 64, torch.device("cpu")))
