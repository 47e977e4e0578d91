"""Renaming foreign state dicts onto ours, with strict accounting of every key.

A converter is a list of regex rules (source pattern -> our name, or a function of the match),
a list of patterns that are known and deliberately unused (e.g. the loss's `empty_weight`), and
fusions that concatenate several source tensors into one of ours (HF's separate q/k/v into a
packed in-projection). A key that no rule or ignore pattern claims is *unexpected*; a parameter
of the model that no key fills is *missing*. Either fails the load, listing the keys.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

Replacement = str | Callable[[re.Match], str]


@dataclass(frozen=True)
class KeyMap:
    rules: tuple[tuple[str, Replacement], ...]
    ignore: tuple[str, ...] = ()
    # (pattern matching the first part, suffixes of the parts in order): e.g. ("(.*)\.query\.(weight|bias)$",
    # ("query", "key", "value"), "\1.qkv.\2") concatenates query, key, value along dim 0.
    fuse: tuple[tuple[str, tuple[str, ...], str], ...] = field(default=())


class CheckpointMismatch(ValueError):
    """The checkpoint's keys do not fit the architecture; the message lists what differs."""


def _fuse(sd: dict[str, Tensor], fusions: Iterable[tuple[str, tuple[str, ...], str]]) -> dict[str, Tensor]:
    out = dict(sd)
    for pattern, parts, target in fusions:
        rx = re.compile(pattern)
        for key in list(out):
            m = rx.fullmatch(key)
            if not m:
                continue
            names = [key.replace(f".{parts[0]}.", f".{p}.", 1) for p in parts]
            if not all(n in out for n in names):
                continue  # left for the unexpected-key report
            out[m.expand(target)] = torch.cat([out.pop(n) for n in names], dim=0)
    return out


def rename(sd: dict[str, Tensor], keymap: KeyMap) -> tuple[dict[str, Tensor], list[str]]:
    """Apply `keymap`: (our state dict, unexpected source keys)."""
    sd = _fuse(sd, keymap.fuse)
    rules = [(re.compile(p), r) for p, r in keymap.rules]
    ignore = [re.compile(p) for p in keymap.ignore]
    out: dict[str, Tensor] = {}
    unexpected: list[str] = []
    for key, value in sd.items():
        if any(rx.fullmatch(key) for rx in ignore):
            continue
        for rx, repl in rules:
            m = rx.fullmatch(key)
            if m:
                new = repl(m) if callable(repl) else m.expand(repl)
                if new in out:
                    raise CheckpointMismatch(f"two checkpoint keys map onto {new!r}")
                out[new] = value
                break
        else:
            unexpected.append(key)
    return out, unexpected


def load_exact(module: nn.Module, sd: dict[str, Tensor], unexpected: Iterable[str] = (), source: str = "") -> None:
    """Load `sd` into `module`, failing with every missing, unexpected and mis-shaped key listed.

    BatchNorm's `num_batches_tracked` counter is the one entry allowed to be absent: it carries no
    weights and no foreign format stores it consistently.
    """
    own = module.state_dict()
    unexpected = list(unexpected) + sorted(k for k in sd if k not in own)
    missing = sorted(k for k in own if k not in sd and not k.endswith("num_batches_tracked"))
    shapes = sorted(
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sd
        if k in own and tuple(sd[k].shape) != tuple(own[k].shape)
    )
    if unexpected or missing or shapes:
        lines = [f"checkpoint {source or ''} does not fit the architecture:".replace("  ", " ")]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if items:
                shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
                lines.append(f"  {title} ({len(items)}): " + ", ".join(shown))
        raise CheckpointMismatch("\n".join(lines))
    full = {k: v for k, v in sd.items()}
    for k in own:
        if k not in full:  # num_batches_tracked
            full[k] = own[k]
    module.load_state_dict(full, strict=True)
