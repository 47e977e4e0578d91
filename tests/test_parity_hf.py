"""Same weights, same inputs: our model computes what Hugging Face's Mask2Former computes."""

from __future__ import annotations

import pytest
import torch

from m2f import model
from tests.hf_models import hf_predictions, tiny_hf_model

# (H, W) network inputs: non-square, and 64x96 puts the deepest Swin map (2x3) below the 7x7 window.
SIZES = [(96, 160), (64, 96), (128, 96)]


def our_predictions(m: model.Mask2Former, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    with torch.no_grad():
        out = m(x, aux=True)
    return [(p.class_logits, p.mask_logits) for p in out.aux] + [(out.class_logits, out.mask_logits)]


@pytest.fixture(scope="module", params=["swin", "resnet"])
def pair(request, tmp_path_factory):
    hf = tiny_hf_model(request.param)
    path = tmp_path_factory.mktemp(f"hf_{request.param}")
    hf.save_pretrained(path)
    return request.param, hf, path


@pytest.mark.parametrize("size", SIZES)
def test_hf_directory_gives_same_logits(pair, size):
    backbone, hf, path = pair
    ours = model.load(str(path))
    torch.manual_seed(1)
    x = torch.randn(2, 3, *size)
    expected = hf_predictions(hf, x)
    got = our_predictions(ours, x)
    assert len(got) == len(expected) == 5  # initial prediction + 4 decoder layers
    for i, ((ec, em), (gc, gm)) in enumerate(zip(expected, got, strict=True)):
        assert gc.shape == ec.shape and gm.shape == em.shape
        assert (gc - ec).abs().max() < 1e-4, f"{backbone} class logits differ at prediction {i}"
        assert (gm - em).abs().max() < 1e-4, f"{backbone} mask logits differ at prediction {i}"
    assert gm.shape[-2:] == (size[0] // 4, size[1] // 4)
    # the inference path (no auxiliary masks; attention masks computed at each level's size) agrees too
    with torch.no_grad():
        fast = ours(x)
    assert fast.aux == []
    assert (fast.class_logits - expected[-1][0]).abs().max() < 1e-4
    assert (fast.mask_logits - expected[-1][1]).abs().max() < 1e-4


def test_hf_config_translation(pair):
    backbone, hf, path = pair
    ours = model.load(str(path))
    cfg = ours.config
    assert cfg.num_classes == 7 and cfg.class_names[3] == "label_3"
    assert cfg.decoder.num_layers == 4 and cfg.decoder.num_queries == 12
    assert cfg.backbone.kind == backbone
    assert len(ours.checkpoint_sha256) == 64


def test_hf_missing_key_fails_with_list(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = tiny_hf_model("resnet")
    hf.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    dropped = "model.transformer_module.decoder.layers.0.fc1.weight"
    del sd[dropped]
    sd["model.some.unknown.weight"] = torch.zeros(3)
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(model.checkpoint.CheckpointMismatch) as err:
        model.load(str(tmp_path))
    msg = str(err.value)
    assert "transformer_decoder.layers.0.linear1.weight" in msg and "missing (1)" in msg
    assert "model.some.unknown.weight" in msg and "unexpected (1)" in msg


def test_own_format_round_trip(pair, tmp_path):
    _, _, path = pair
    ours = model.load(str(path))
    digest = model.save(ours, tmp_path / "m.safetensors")
    again = model.load(str(tmp_path / "m.safetensors"))
    assert again.config == ours.config and again.checkpoint_sha256 == digest
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ours(x).mask_logits, again(x).mask_logits)
