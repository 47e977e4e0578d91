"""Official (detectron2) checkpoints: written here from Hugging Face weights, loaded by `model.load`.

The converter below is the test's own, from HF's in-memory names to the official ones. The official
names were read from facebookresearch/Mask2Former and detectron2:
- `mask2former/modeling/backbone/swin.py` (D2SwinTransformer: `patch_embed.proj/norm`,
  `layers.i.blocks.j.{norm1, attn.qkv, attn.proj, attn.relative_position_bias_table,
  attn.relative_position_index (a persistent buffer), norm2, mlp.fc1, mlp.fc2}`, `layers.i.downsample`,
  one `norm{i}` per output);
- detectron2 `detectron2/modeling/backbone/resnet.py` (BasicStem `stem.conv1`, `res{2..5}.j.{conv1, conv2,
  conv3, shortcut}`, each a detectron2 Conv2d whose FrozenBatchNorm is its `.norm`);
- `mask2former/modeling/meta_arch/mask_former_head.py` (`sem_seg_head.pixel_decoder`, `sem_seg_head.predictor`);
- `mask2former/modeling/pixel_decoder/msdeformattn.py` (`input_proj.l.{0,1}`, `transformer.level_embed`,
  `transformer.encoder.layers.i.{self_attn.*, norm1, linear1, linear2, norm2}`, `adapter_1(.norm)`,
  `layer_1(.norm)`, `mask_features`);
- `mask2former/modeling/transformer_decoder/mask2former_transformer_decoder.py` (`query_feat`, `query_embed`,
  `level_embed`, `transformer_{cross,self}_attention_layers.i.{multihead_attn|self_attn}` (nn.MultiheadAttention),
  `.norm`, `transformer_ffn_layers.i.{linear1, linear2, norm}`, `decoder_norm`, `class_embed`, `mask_embed.layers.k`);
- `mask2former/modeling/criterion.py` (the `empty_weight` buffer of SetCriterion, saved as `criterion.empty_weight`).
"""

from __future__ import annotations

import pickle
import re

import numpy as np
import pytest
import torch

from m2f import model
from m2f.model.keymap import CheckpointMismatch
from m2f.model.presets import PRESETS
from m2f.model.swin import relative_position_index
from tests.hf_models import hf_predictions, tiny_hf_model

ENC = "model.pixel_level_module.encoder."
PIX = "model.pixel_level_module.decoder."
TRF = "model.transformer_module."
D2P = "sem_seg_head.pixel_decoder."
D2T = "sem_seg_head.predictor."


pytestmark = pytest.mark.usefixtures("one_thread")


# (HF in-memory name pattern, official name); the backbone rules cover HF's Swin and ResNet.
RULES: list[tuple[str, str]] = [
    # Swin
    (r"swin\.embeddings\.patch_embeddings\.projection\.(\w+)", r"backbone.patch_embed.proj.\1"),
    (r"swin\.embeddings\.norm\.(\w+)", r"backbone.patch_embed.norm.\1"),
    (
        r"swin\.encoder\.layers\.(\d+)\.blocks\.(\d+)\.attention\.o_proj\.(\w+)",
        r"backbone.layers.\1.blocks.\2.attn.proj.\3",
    ),
    (
        r"swin\.encoder\.layers\.(\d+)\.blocks\.(\d+)\.attention\.relative_position_bias\.relative_position_bias_table",
        r"backbone.layers.\1.blocks.\2.attn.relative_position_bias_table",
    ),
    (r"swin\.encoder\.layers\.(\d+)\.blocks\.(\d+)\.layernorm_before\.(\w+)", r"backbone.layers.\1.blocks.\2.norm1.\3"),
    (r"swin\.encoder\.layers\.(\d+)\.blocks\.(\d+)\.layernorm_after\.(\w+)", r"backbone.layers.\1.blocks.\2.norm2.\3"),
    (r"swin\.encoder\.layers\.(\d+)\.blocks\.(\d+)\.mlp\.(fc1|fc2)\.(\w+)", r"backbone.layers.\1.blocks.\2.mlp.\3.\4"),
    (r"swin\.encoder\.layers\.(\d+)\.downsample\.(reduction|norm)\.(\w+)", r"backbone.layers.\1.downsample.\2.\3"),
    # ResNet
    (r"embedder\.embedder\.convolution\.weight", r"backbone.stem.conv1.weight"),
    (r"embedder\.embedder\.normalization\.(\w+)", r"backbone.stem.conv1.norm.\1"),
    (r"encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.convolution\.weight", "RES shortcut.weight"),
    (r"encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.normalization\.(\w+)", r"RES shortcut.norm.\3"),
    (r"encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d)\.convolution\.weight", "RES conv.weight"),
    (r"encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d)\.normalization\.(\w+)", r"RES conv.norm.\4"),
]
PIXEL_RULES: list[tuple[str, str]] = [
    (r"input_projections\.(\d)\.(\d)\.(\w+)", D2P + r"input_proj.\1.\2.\3"),
    (r"level_embed", D2P + "transformer.level_embed"),
    (r"encoder\.layers\.(\d+)\.self_attn\.(\w+)\.(\w+)", D2P + r"transformer.encoder.layers.\1.self_attn.\2.\3"),
    (r"encoder\.layers\.(\d+)\.self_attn_layer_norm\.(\w+)", D2P + r"transformer.encoder.layers.\1.norm1.\2"),
    (r"encoder\.layers\.(\d+)\.fc1\.(\w+)", D2P + r"transformer.encoder.layers.\1.linear1.\2"),
    (r"encoder\.layers\.(\d+)\.fc2\.(\w+)", D2P + r"transformer.encoder.layers.\1.linear2.\2"),
    (r"encoder\.layers\.(\d+)\.final_layer_norm\.(\w+)", D2P + r"transformer.encoder.layers.\1.norm2.\2"),
    (r"(adapter_1|layer_1)\.0\.weight", D2P + r"\1.weight"),
    (r"(adapter_1|layer_1)\.1\.(\w+)", D2P + r"\1.norm.\2"),
    (r"mask_projection\.(\w+)", D2P + r"mask_features.\1"),
]
DECODER_RULES: list[tuple[str, str]] = [
    (r"queries_features\.weight", D2T + "query_feat.weight"),
    (r"queries_embedder\.weight", D2T + "query_embed.weight"),
    (r"level_embed\.weight", D2T + "level_embed.weight"),
    (r"input_projections\.(\d)\.(\w+)", D2T + r"input_proj.\1.\2"),
    (
        r"decoder\.layers\.(\d+)\.cross_attn\.(in_proj_weight|in_proj_bias|out_proj\.\w+)",
        D2T + r"transformer_cross_attention_layers.\1.multihead_attn.\2",
    ),
    (r"decoder\.layers\.(\d+)\.cross_attn_layer_norm\.(\w+)", D2T + r"transformer_cross_attention_layers.\1.norm.\2"),
    (
        r"decoder\.layers\.(\d+)\.self_attn\.out_proj\.(\w+)",
        D2T + r"transformer_self_attention_layers.\1.self_attn.out_proj.\2",
    ),
    (r"decoder\.layers\.(\d+)\.self_attn_layer_norm\.(\w+)", D2T + r"transformer_self_attention_layers.\1.norm.\2"),
    (r"decoder\.layers\.(\d+)\.fc1\.(\w+)", D2T + r"transformer_ffn_layers.\1.linear1.\2"),
    (r"decoder\.layers\.(\d+)\.fc2\.(\w+)", D2T + r"transformer_ffn_layers.\1.linear2.\2"),
    (r"decoder\.layers\.(\d+)\.final_layer_norm\.(\w+)", D2T + r"transformer_ffn_layers.\1.norm.\2"),
    (r"decoder\.layernorm\.(\w+)", D2T + r"decoder_norm.\1"),
    (r"decoder\.mask_predictor\.mask_embedder\.(\d)\.0\.(\w+)", D2T + r"mask_embed.layers.\1.\2"),
]


def official_relative_position_index(window: int) -> np.ndarray:
    """The Swin buffer as the official WindowAttention builds it, (window², window²) int64."""
    ys, xs = np.meshgrid(np.arange(window), np.arange(window), indexing="ij")
    flat = np.stack([ys.ravel(), xs.ravel()])  # (2, N)
    rel = (flat[:, :, None] - flat[:, None, :]).transpose(1, 2, 0) + (window - 1)  # (N, N, 2)
    return (rel[..., 0] * (2 * window - 1) + rel[..., 1]).astype(np.int64)


def _rename(name: str, rules: list[tuple[str, str]]) -> str | None:
    for pattern, target in rules:
        m = re.fullmatch(pattern, name)
        if m is None:
            continue
        if target.startswith("RES "):  # ResNet: HF stage i / layer j / conv k -> res{i+2}.j.conv{k+1}
            stage, block = int(m[1]) + 2, m[2]
            rest = m.expand(target[4:])
            if rest.startswith("conv"):
                rest = f"conv{int(m[3]) + 1}" + rest[4:]
            return f"backbone.res{stage}.{block}.{rest}"
        return m.expand(target)
    return None


def hf_to_detectron2(hf_model, window: int = 7) -> dict[str, np.ndarray]:
    """HF Mask2Former state dict -> official detectron2 names, numpy arrays (every HF key accounted for)."""
    sd = {k: v.detach().clone() for k, v in hf_model.state_dict().items()}
    # HF keeps q, k, v apart (in any order); official Swin and nn.MultiheadAttention pack them, q first
    for name in [k for k in sd if re.search(r"\.(swin\.encoder|decoder\.layers)\..*\.q_proj\.(weight|bias)$", k)]:
        parts = [sd.pop(name.replace(".q_proj.", f".{p}_proj.")) for p in "qkv"]
        sd[name.replace(".q_proj.", ".qkv_packed.")] = torch.cat(parts)
    out: dict[str, np.ndarray] = {}
    left: list[str] = []
    for name, value in sd.items():
        if name.endswith("num_batches_tracked"):
            continue  # detectron2's FrozenBatchNorm2d has no counter
        if name.startswith(ENC):
            local = name[len(ENC) :]
            stage = re.fullmatch(r"hidden_states_norms\.stage(\d)\.(\w+)", local)
            qkv = re.fullmatch(r"swin\.encoder\.layers\.(\d+)\.blocks\.(\d+)\.attention\.qkv_packed\.(\w+)", local)
            if local.startswith("swin.layernorm."):
                continue  # SwinModel's final norm: HF-only, unused by the backbone
            if stage:
                out[f"backbone.norm{int(stage[1]) - 1}.{stage[2]}"] = value.numpy()
                continue
            if qkv:
                i, j, kind = qkv.groups()
                out[f"backbone.layers.{i}.blocks.{j}.attn.qkv.{kind}"] = value.numpy()
                out[f"backbone.layers.{i}.blocks.{j}.attn.relative_position_index"] = official_relative_position_index(
                    window
                )
                continue
            new = _rename(local, RULES)
        elif name.startswith(PIX):
            new = _rename(name[len(PIX) :], PIXEL_RULES)
        elif name.startswith(TRF):
            local = name[len(TRF) :]
            qkv = re.fullmatch(r"decoder\.layers\.(\d+)\.self_attn\.qkv_packed\.(weight|bias)", local)
            if qkv:
                out[D2T + f"transformer_self_attention_layers.{qkv[1]}.self_attn.in_proj_{qkv[2]}"] = value.numpy()
                continue
            new = _rename(local, DECODER_RULES)
        elif name.startswith("class_predictor."):
            new = D2T + "class_embed." + name.split(".", 1)[1]
        elif name == "criterion.empty_weight":
            new = name
        else:
            new = None
        if new is None:
            left.append(name)
        else:
            assert new not in out, new
            out[new] = value.numpy()
    assert not left, f"the test converter does not know {left}"
    return out


def write_pkl(weights: dict[str, np.ndarray], path) -> None:
    """As the model zoo's model_final_*.pkl: a protocol-2 pickle of numpy arrays in plain dicts."""
    blob = {"model": weights, "__author__": "Mask2Former test", "matching_heuristics": True}
    with open(path, "wb") as f:
        pickle.dump(blob, f, protocol=2)


def write_pth(weights: dict[str, np.ndarray], path) -> None:
    torch.save({"model": {k: torch.from_numpy(v) for k, v in weights.items()}, "iteration": 5}, path)


def predictions(m, x):
    with torch.no_grad():
        out = m(x, aux=True)
    return [(p.class_logits, p.mask_logits) for p in out.aux] + [(out.class_logits, out.mask_logits)]


@pytest.fixture(scope="module", params=["swin", "resnet"])
def official(request, tmp_path_factory):
    hf = tiny_hf_model(request.param)
    weights = hf_to_detectron2(hf)
    root = tmp_path_factory.mktemp(f"d2_{request.param}")
    write_pkl(weights, root / "model_final_test.pkl")
    write_pth(weights, root / "model_final_test.pth")
    return request.param, hf, weights, root


SWIN_NAMES = [
    "backbone.patch_embed.proj.weight",
    "backbone.patch_embed.norm.bias",
    "backbone.layers.0.blocks.1.attn.qkv.weight",
    "backbone.layers.0.blocks.0.attn.relative_position_index",
    "backbone.layers.2.blocks.1.attn.relative_position_bias_table",
    "backbone.layers.1.blocks.0.mlp.fc2.bias",
    "backbone.layers.2.downsample.reduction.weight",
    "backbone.norm3.weight",
]
RESNET_NAMES = [
    "backbone.stem.conv1.weight",
    "backbone.stem.conv1.norm.running_var",
    "backbone.res2.0.conv1.norm.weight",
    "backbone.res2.0.shortcut.weight",
    "backbone.res3.1.conv3.weight",
    "backbone.res5.0.conv2.norm.running_mean",
    "backbone.res4.0.shortcut.norm.bias",
]
HEAD_NAMES = [
    "sem_seg_head.pixel_decoder.input_proj.2.1.weight",
    "sem_seg_head.pixel_decoder.transformer.level_embed",
    "sem_seg_head.pixel_decoder.transformer.encoder.layers.1.self_attn.sampling_offsets.weight",
    "sem_seg_head.pixel_decoder.transformer.encoder.layers.0.norm2.bias",
    "sem_seg_head.pixel_decoder.adapter_1.weight",
    "sem_seg_head.pixel_decoder.adapter_1.norm.weight",
    "sem_seg_head.pixel_decoder.layer_1.norm.bias",
    "sem_seg_head.pixel_decoder.mask_features.weight",
    "sem_seg_head.predictor.query_feat.weight",
    "sem_seg_head.predictor.query_embed.weight",
    "sem_seg_head.predictor.level_embed.weight",
    "sem_seg_head.predictor.transformer_cross_attention_layers.3.multihead_attn.in_proj_weight",
    "sem_seg_head.predictor.transformer_self_attention_layers.0.self_attn.in_proj_bias",
    "sem_seg_head.predictor.transformer_self_attention_layers.2.norm.weight",
    "sem_seg_head.predictor.transformer_ffn_layers.1.linear2.weight",
    "sem_seg_head.predictor.decoder_norm.weight",
    "sem_seg_head.predictor.class_embed.bias",
    "sem_seg_head.predictor.mask_embed.layers.2.bias",
    "criterion.empty_weight",
]


def test_written_checkpoint_uses_official_names(official):
    backbone, _, weights, root = official
    expected = HEAD_NAMES + (SWIN_NAMES if backbone == "swin" else RESNET_NAMES)
    assert not [name for name in expected if name not in weights]
    assert all(k.startswith(("backbone.", "sem_seg_head.", "criterion.")) for k in weights)
    with open(root / "model_final_test.pkl", "rb") as f:
        raw = pickle.load(f, encoding="latin1")  # noqa: S301 - our own file
    assert raw["matching_heuristics"] is True
    assert all(isinstance(v, np.ndarray) for v in raw["model"].values())
    if backbone == "swin":
        index = raw["model"]["backbone.layers.1.blocks.0.attn.relative_position_index"]
        assert index.shape == (49, 49) and index.dtype == np.int64 and index.max() == 168
        assert np.array_equal(index, relative_position_index(7).numpy())  # what our Swin derives instead
        assert raw["model"]["backbone.layers.0.blocks.0.attn.qkv.weight"].shape == (96, 32)


@pytest.mark.parametrize("suffix", [".pkl", ".pth"])
def test_detectron2_checkpoint_gives_hf_logits(official, suffix):
    backbone, hf, _, root = official
    ours = model.load(root / f"model_final_test{suffix}")
    assert ours.config.backbone.kind == backbone
    assert ours.config.num_classes == 7 and ours.config.decoder.num_queries == 12
    assert ours.config.decoder.num_heads == ours.config.pixel_decoder.num_heads == 4
    torch.manual_seed(2)
    worst = 0.0
    # 64x96: the deepest Swin map (2x3) is below the 7x7 window; the .pth holds the same arrays, one size will do
    for size in [(64, 96), (96, 160)] if suffix == ".pkl" else [(64, 96)]:
        x = torch.randn(2, 3, *size)
        expected, got = hf_predictions(hf, x), predictions(ours, x)
        assert len(got) == len(expected) == 5
        for (ec, em), (gc, gm) in zip(expected, got, strict=True):
            assert gc.shape == ec.shape and gm.shape == em.shape
            worst = max(worst, (gc - ec).abs().max().item(), (gm - em).abs().max().item())
    print(f"{backbone}{suffix}: max abs difference to HF over all predictions {worst:.2e}")
    assert worst < 1e-4, f"{backbone}{suffix}: max abs difference {worst:.2e}"


def test_config_comes_from_the_weights(official):
    backbone, _, _, root = official
    cfg = model.load(root / "model_final_test.pkl").config
    if backbone == "swin":
        assert (cfg.backbone.embed_dim, cfg.backbone.depths, cfg.backbone.num_heads) == (32, (2, 2, 2, 2), (1, 2, 4, 8))
        assert cfg.backbone.window_size == 7
    else:
        assert cfg.backbone.depths == (1, 2, 1, 1) and cfg.backbone.widths == (32, 64, 128, 256)
        assert cfg.backbone.stem_channels == 16
    assert (cfg.pixel_decoder.conv_dim, cfg.pixel_decoder.ffn_dim, cfg.pixel_decoder.num_layers) == (64, 96, 2)
    assert (cfg.decoder.hidden_dim, cfg.decoder.ffn_dim, cfg.decoder.num_layers) == (64, 128, 4)
    assert cfg.class_names == tuple(f"class_{i}" for i in range(7))  # no names in a .pkl, no known dataset


def test_extra_or_missing_key_fails_listing_it(official, tmp_path):
    _, _, weights, _ = official
    extra = dict(weights)
    extra["sem_seg_head.predictor.some_new_layer.weight"] = np.zeros(3, dtype=np.float32)
    write_pkl(extra, tmp_path / "extra.pkl")
    with pytest.raises(CheckpointMismatch, match=r"unexpected \(1\): sem_seg_head\.predictor\.some_new_layer\.weight"):
        model.load(tmp_path / "extra.pkl")

    missing = dict(weights)
    del missing["sem_seg_head.predictor.transformer_ffn_layers.2.linear1.bias"]
    write_pth(missing, tmp_path / "missing.pth")
    with pytest.raises(CheckpointMismatch, match=r"missing \(1\): transformer_decoder\.layers\.2\.linear1\.bias"):
        model.load(tmp_path / "missing.pth")


def test_missing_shape_defining_key_is_named(official, tmp_path):
    _, _, weights, _ = official
    missing = {k: v for k, v in weights.items() if k != "sem_seg_head.predictor.query_feat.weight"}
    write_pkl(missing, tmp_path / "no_queries.pkl")
    with pytest.raises(CheckpointMismatch, match=r"sem_seg_head\.predictor\.query_feat\.weight"):
        model.load(tmp_path / "no_queries.pkl")


def with_classes(weights: dict[str, np.ndarray], count: int) -> dict[str, np.ndarray]:
    """The same checkpoint with a class head for `count` classes (+ no-object)."""
    rng = np.random.default_rng(0)
    out = dict(weights)
    hidden = weights[D2T + "class_embed.weight"].shape[1]
    out[D2T + "class_embed.weight"] = rng.standard_normal((count + 1, hidden)).astype(np.float32)
    out[D2T + "class_embed.bias"] = rng.standard_normal(count + 1).astype(np.float32)
    out["criterion.empty_weight"] = np.ones(count + 1, dtype=np.float32)
    return out


@pytest.mark.parametrize("official", ["resnet"], indirect=True)  # class handling does not depend on the backbone
def test_preset_names_the_classes(official, tmp_path):
    _, _, weights, _ = official
    write_pkl(with_classes(weights, 19), tmp_path / "cityscapes.pkl")

    inferred = model.load(tmp_path / "cityscapes.pkl").config  # 19 classes: Cityscapes, semantic by default
    assert inferred.class_names == PRESETS["r50_cityscapes_semantic"].class_names and inferred.task == "semantic"

    named = model.load(tmp_path / "cityscapes.pkl", preset="r50_cityscapes_panoptic").config
    want = PRESETS["r50_cityscapes_panoptic"]
    assert named.class_names == want.class_names and named.is_thing == want.is_thing
    assert named.task == "panoptic" and named.preprocess.min_size == 1024
    assert named.backbone.widths == (32, 64, 128, 256)  # the architecture still comes from the weights

    with pytest.raises(ValueError, match="preset 'r50_coco_panoptic' has 133 classes, the checkpoint 19"):
        model.load(tmp_path / "cityscapes.pkl", preset="r50_coco_panoptic")
    with pytest.raises(ValueError, match="unknown preset 'r50_mars'"):
        model.load(tmp_path / "cityscapes.pkl", preset="r50_mars")
