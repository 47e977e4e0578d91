"""Reading pickled checkpoints without letting them run code.

A pickle is a program: its GLOBAL/REDUCE opcodes can import and call anything (`os.system`).
detectron2's `.pkl` files only need numpy arrays inside plain containers, so `RestrictedUnpickler`
resolves only the handful of globals that rebuild those and refuses every other one *before* it
is imported or called. `.pth` files go through `torch.load(weights_only=True)`, PyTorch's own
allow-list unpickler.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import numpy as np
import torch

# (module, name) pairs that reconstruct numpy arrays, dtypes and scalars, and ordered dicts.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),  # protocol 5 (Python 3.14's default) rebuilds arrays this way
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),  # how Python 2 pickles store byte strings under encoding="latin1"
}


class UnsafeCheckpointError(ValueError):
    """The checkpoint asks to import or call something that is not plain data."""


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"refusing to load checkpoint: it references {module}.{name}, which is not tensor or array data "
            "(a pickle can run arbitrary code; only numpy arrays in plain containers are accepted)"
        )


def load_pickle(data: bytes) -> Any:
    """Unpickle detectron2-style data (numpy arrays in dicts/lists) and nothing else."""
    try:
        return RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except UnsafeCheckpointError:
        raise
    except Exception as err:
        raise ValueError(f"not a readable pickle checkpoint: {err}") from err


def load_torch(data: bytes) -> Any:
    """torch.save files, through PyTorch's weights-only unpickler."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"refusing to load checkpoint: it contains objects other than tensors and plain containers ({err})"
        ) from err
    except RuntimeError as err:
        if "zip" in str(err).lower() or "magic" in str(err).lower():
            raise ValueError(f"not a readable torch checkpoint: {err}") from err
        raise


def as_tensor(value: Any, key: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biufc":  # object, string, void ... arrays hold no weights
            raise ValueError(f"checkpoint entry {key!r} is a numpy array of {value.dtype}, not numbers")
        value = np.ascontiguousarray(value)
        return torch.from_numpy(value if value.flags.writeable else value.copy())
    if isinstance(value, np.generic | int | float):
        return torch.tensor(value)
    raise ValueError(f"checkpoint entry {key!r} is a {type(value).__name__}, not an array")
