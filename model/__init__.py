"""Mask2Former in plain PyTorch: architecture, checkpoint loading, pre- and post-processing.

`model.load(path_or_uri, device="cpu")` returns the `torch.nn.Module`; its `forward(pixel_values)`
takes (B, 3, H, W) normalised with the model's mean/std and returns `class_logits` (B, Q, K+1) and
`mask_logits` (B, Q, H/4, W/4) (plus `aux`, the earlier decoder predictions).
"""

from m2f.model.checkpoint import DEMO_MODEL, load, save
from m2f.model.config import ModelConfig
from m2f.model.mask2former import Mask2Former, Mask2FormerOutput, build_model
from m2f.model.presets import PRESETS

__all__ = ["DEMO_MODEL", "PRESETS", "Mask2Former", "Mask2FormerOutput", "ModelConfig", "build_model", "load", "save"]
