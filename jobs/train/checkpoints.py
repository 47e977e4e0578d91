"""Training checkpoints under OUTPUT, written by rank 0 (local or object storage).

`checkpoints/step_NNNNNNN.safetensors` (the model, loadable by `model.load` and `m2f segment`) and
`.state.pt` beside it (optimizer, step), then `metrics.jsonl`, then `latest.json` pointing at the pair:
written last, so a run killed at any moment resumes from the last complete pair. Older pairs are pruned.
"""

from __future__ import annotations

import io
import json
from typing import Any

import torch

from m2f.jobs.common.configs import TrainConfig
from m2f.pipeline.storage import open_fs, write_atomic

KEEP_CHECKPOINTS = 3


def _ckpt_dir(cfg: TrainConfig) -> str:
    return f"{cfg.output.rstrip('/')}/checkpoints"


def read_latest(cfg: TrainConfig) -> dict[str, Any] | None:
    fs, path = open_fs(f"{cfg.output.rstrip('/')}/latest.json", cfg.options(cfg.output))
    if not fs.exists(path):
        return None
    return json.loads(fs.cat_file(path))


def write_checkpoint(
    cfg: TrainConfig, model: torch.nn.Module, state: dict[str, Any], step: int, metrics_lines: list[str]
) -> str:
    """Model + trainer state, then metrics, then latest.json (the commit point)."""
    from m2f.model.checkpoint import to_bytes

    opts = cfg.options(cfg.output)
    out = cfg.output.rstrip("/")
    name = f"step_{step:07d}"
    fs, _ = open_fs(out, opts)
    files = {
        f"{_ckpt_dir(cfg)}/{name}.safetensors": to_bytes(model),
        f"{_ckpt_dir(cfg)}/{name}.state.pt": _torch_bytes(state),
        f"{out}/metrics.jsonl": "".join(metrics_lines).encode(),
    }
    for uri, data in files.items():
        fs_, path = open_fs(uri, opts)
        fs_.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        write_atomic(fs_, path, data)
    latest = {"step": step, "model": f"checkpoints/{name}.safetensors", "state": f"checkpoints/{name}.state.pt"}
    fs_, path = open_fs(f"{out}/latest.json", opts)
    write_atomic(fs_, path, json.dumps(latest).encode())
    _prune(cfg, keep=KEEP_CHECKPOINTS)
    return f"{out}/{latest['model']}"


def _prune(cfg: TrainConfig, keep: int) -> None:
    fs, path = open_fs(_ckpt_dir(cfg), cfg.options(cfg.output))
    try:
        names = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".safetensors"))
    except FileNotFoundError:
        return
    for old in names[:-keep]:
        for p in (old, old.replace(".safetensors", ".state.pt")):
            if fs.exists(p):
                fs.rm(p)


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()
