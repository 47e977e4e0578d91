"""`load` and `save`: every checkpoint format, from any fsspec URI.

Formats, detected in this order:
- a Hugging Face directory (`config.json` with model_type mask2former + `model.safetensors` or
  `pytorch_model.bin`);
- the project's own file: one `.safetensors` whose header metadata holds our `ModelConfig` as JSON
  (weights and class names travel together, nothing is pickled);
- an official detectron2 checkpoint: `.pkl` (restricted unpickler) or `.pth` (`torch.load`
  weights-only), architecture read off the weights' shapes.
Every key must be consumed and every parameter filled, or the load fails listing the differences.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from m2f.model import convert_detectron2 as d2
from m2f.model import convert_hf as hf
from m2f.model.config import ModelConfig
from m2f.model.keymap import CheckpointMismatch, load_exact, rename
from m2f.model.mask2former import Mask2Former, build_model
from m2f.model.safe_pickle import load_pickle, load_torch

FORMAT_TAG = "m2f"
FORMAT_VERSION = 1
DEMO_MODEL = Path(__file__).parent / "assets" / "demo.safetensors"
NAMED_PREFIXES = ("zoo:", "hf://", "http://", "https://")  # weights by name: fetched and cached (model.fetch)


def load(
    path_or_uri: str | Path,
    device: str | torch.device = "cpu",
    *,
    preset: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Mask2Former:
    """Build the model a checkpoint describes and load its weights (eval mode, on `device`).

    `preset` names the dataset preset of a detectron2 checkpoint (e.g. "swin_l_coco_panoptic") when
    its class count is ambiguous; the architecture itself always comes from the weights. A name with a
    prefix, `zoo:NAME`, `hf://OWNER/NAME[@REV]` or an http(s) URL, is fetched once into its cache first
    (`model.fetch.resolve`; a zoo entry brings its preset).
    """
    uri = str(path_or_uri)
    if uri == "demo":
        uri = str(DEMO_MODEL)
    elif uri.startswith(NAMED_PREFIXES):
        from m2f.model.fetch import resolve  # here: fetch imports this module's neighbours lazily too

        resolved = resolve(uri)
        uri, preset, storage_options = resolved.local, preset or resolved.preset, None
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    if not fs.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {uri}")
    if fs.isdir(path):
        model, digest = _load_hf_dir(fs, path)
    else:
        data = fs.cat_file(path)
        digest = hashlib.sha256(data).hexdigest()
        model = _load_file(data, Path(path).name, preset)
    model.checkpoint_sha256 = digest
    return model.to(device).eval()


def _hf_dir_name(path: str) -> str:
    """A Hugging Face folder's model name: its own name, or for a snapshot in Hugging Face's cache
    (`models--OWNER--NAME/snapshots/<commit>`) the repo's NAME, as the folder `huggingface-cli download`
    would have made: a model has one name (and one `model` column) however it was fetched."""
    parts = Path(path.rstrip("/")).parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3].split("--", 2)[-1]
    return parts[-1] if parts else path


def _load_file(data: bytes, name: str, preset: str | None) -> Mask2Former:
    if name.endswith(".safetensors"):
        meta = safetensors_metadata(data)
        if meta.get("format") != FORMAT_TAG:
            raise ValueError(
                f"{name}: a bare .safetensors file without our config; pass the Hugging Face directory "
                "that holds it (config.json beside it) or a file written by model.save"
            )
        config = ModelConfig.from_dict(json.loads(meta["config"]))
        model = build_model(config)
        load_exact(model, load_safetensors_bytes(data), source=name)
        return model
    if name.endswith(".pkl"):
        raw = d2.unwrap(load_pickle(data))
    elif name.endswith((".pth", ".pt", ".bin")):
        raw = d2.unwrap(load_torch(data))
    else:
        raise ValueError(f"{name}: unknown checkpoint type (expected a directory, .safetensors, .pkl or .pth)")
    sd = d2.to_tensor_dict(raw)
    if not d2.is_detectron2(set(sd)):
        raise ValueError(f"{name}: no sem_seg_head.predictor.* keys: not an official Mask2Former checkpoint")
    config = d2.config_from_detectron2(sd, preset, name=Path(name).stem)
    model = build_model(config)
    ours, unexpected = rename(sd, d2.D2_KEYMAP)
    load_exact(model, ours, unexpected, source=name)
    return model


def _load_hf_dir(fs: fsspec.AbstractFileSystem, path: str) -> tuple[Mask2Former, str]:
    def read(name: str) -> bytes | None:
        p = f"{path.rstrip('/')}/{name}"
        return fs.cat_file(p) if fs.exists(p) else None

    raw_config = read("config.json")
    if raw_config is None:
        raise ValueError(f"{path}: a directory without config.json is not a Hugging Face checkpoint")
    pre = read("preprocessor_config.json")
    config = hf.config_from_hf(json.loads(raw_config), json.loads(pre) if pre else None, name=_hf_dir_name(path))
    weights = read("model.safetensors")
    if weights is not None:
        sd = load_safetensors_bytes(weights)
    elif (weights := read("pytorch_model.bin")) is not None:
        sd = load_torch(weights)
    else:
        raise ValueError(
            f"{path}: neither model.safetensors nor pytorch_model.bin found (sharded HF checkpoints "
            "are not supported; re-save with save_pretrained(max_shard_size='10GB'))"
        )
    model = build_model(config)
    ours, unexpected = rename(sd, hf.HF_KEYMAP)
    load_exact(model, ours, unexpected, source=path)
    return model, hashlib.sha256(weights).hexdigest()


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors blob (header: u64 little-endian length, then JSON)."""
    if len(data) < 8:
        raise ValueError("not a safetensors file (too short)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise ValueError("not a safetensors file (bad header length)")
    return json.loads(data[8 : 8 + n]).get("__metadata__", {}) or {}


def to_bytes(model: Mask2Former, config: ModelConfig | None = None) -> bytes:
    config = config or model.config
    sd = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT_TAG, "version": str(FORMAT_VERSION), "config": json.dumps(config.to_dict())}
    return _canonical_header(save_safetensors_bytes(sd, metadata=meta))


def _canonical_header(data: bytes) -> bytes:
    """The same file with its JSON header's keys sorted: safetensors writes `__metadata__` in hash-map
    order, which changes from call to call, so equal models would get different bytes and sha256."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.dumps(json.loads(data[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # tensor data stays 8-byte aligned
    return struct.pack("<Q", len(header)) + header + data[8 + n :]


def save(model: Mask2Former, path_or_uri: str | Path, *, storage_options: dict[str, Any] | None = None) -> str:
    """Write the project's format (one .safetensors with the config inside); returns the sha256."""
    data = to_bytes(model)
    uri = str(path_or_uri)
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if isinstance(fs, LocalFileSystem):  # write aside, then rename: readers never see half a file
        tmp = f"{path}.tmp-{hashlib.sha1(data[:4096]).hexdigest()[:8]}"
        fs.pipe_file(tmp, data)
        fs.mv(tmp, path)
    else:
        fs.pipe_file(path, data)  # one PUT: atomic on object stores
    return hashlib.sha256(data).hexdigest()


__all__ = ["load", "save", "to_bytes", "CheckpointMismatch", "DEMO_MODEL"]
