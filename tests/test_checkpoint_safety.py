"""Pickled checkpoints cannot run code: crafted payloads are refused and their commands never run.

Each payload is first shown to be live (plain `pickle.loads` / `torch.load(weights_only=False)` does run
it, touching a control file), then `model.load` must refuse the same bytes with UnsafeCheckpointError
and leave its own marker file uncreated.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import pickle
import subprocess
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from m2f import model
from m2f.model.safe_pickle import UnsafeCheckpointError, load_pickle


class Shell:
    """Unpickling this calls os.system(command)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class Subprocess:
    """Unpickling this calls subprocess.check_call([...])."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv

    def __reduce__(self):
        return (subprocess.check_call, (self.argv,))


class Eval:
    """Unpickling this calls builtins.eval(source)."""

    def __init__(self, source: str) -> None:
        self.source = source

    def __reduce__(self):
        return (builtins.eval, (self.source,))


def getattr_chain(path: Path) -> bytes:
    """Hand-written protocol-0 pickle: getattr(__import__('os'), 'system')('touch <path>'), no os.system global."""
    return (
        b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(S'os'\ntRS'system'\ntR(S'touch " + str(path).encode() + b"'\ntR."
    )


def checkpoint_with(payload: object) -> dict:
    """An otherwise valid detectron2-style dict with the payload nested among the weights."""
    weights = OrderedDict(
        [
            ("sem_seg_head.predictor.query_feat.weight", np.zeros((4, 8), dtype=np.float32)),
            ("sem_seg_head.predictor.extra", [np.ones(2, dtype=np.float32), {"deep": payload}]),
        ]
    )
    return {"model": weights, "__author__": "attacker", "matching_heuristics": True}


def payloads(marker: Path) -> dict[str, bytes]:
    return {
        "os.system": pickle.dumps(checkpoint_with(Shell(f"touch {marker}")), protocol=2),
        "subprocess": pickle.dumps(checkpoint_with(Subprocess(["touch", str(marker)])), protocol=4),
        "eval": pickle.dumps(checkpoint_with(Eval(f"open({str(marker)!r}, 'w').close()")), protocol=2),
        "getattr chain": getattr_chain(marker),
    }


PAYLOADS = ["os.system", "subprocess", "eval", "getattr chain"]
REFUSED_GLOBAL = {
    "os.system": "posix.system",
    "subprocess": "subprocess.check_call",
    "eval": "__builtin__.eval",  # protocol 2 writes the Python 2 module name
    "getattr chain": "builtins.getattr",
}


@pytest.mark.parametrize("kind", PAYLOADS)
def test_payload_is_live_under_plain_pickle(kind, tmp_path):
    control = tmp_path / "control"
    pickle.loads(payloads(control)[kind])  # noqa: S301 - proving the payload works, on a control file
    assert control.exists()


@pytest.mark.parametrize("kind", PAYLOADS)
def test_malicious_pkl_is_refused_and_does_not_run(kind, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model_final_evil.pkl"
    path.write_bytes(payloads(marker)[kind])
    with pytest.raises(UnsafeCheckpointError) as err:
        model.load(path)
    message = str(err.value)
    assert "refusing to load checkpoint" in message and REFUSED_GLOBAL[kind] in message
    assert "arbitrary code" in message
    assert not marker.exists()


def test_malicious_pth_is_refused_and_does_not_run(tmp_path):
    control = tmp_path / "control"
    buffer = io.BytesIO()
    torch.save({"model": {"w": torch.zeros(2), "evil": Shell(f"touch {control}")}, "iteration": 5}, buffer)
    torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)  # noqa: S614 - proving the payload works
    assert control.exists()

    marker = tmp_path / "pwned"
    path = tmp_path / "model_final_evil.pth"
    torch.save({"model": {"w": torch.zeros(2), "evil": Shell(f"touch {marker}")}, "iteration": 5}, path)
    with pytest.raises(UnsafeCheckpointError, match="refusing to load checkpoint.*other than tensors"):
        model.load(path)
    assert not marker.exists()


def test_malicious_pytorch_model_bin_in_hf_directory_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    config = {"model_type": "mask2former", "backbone_config": {"model_type": "resnet"}, "num_labels": 2}
    (hf_dir / "config.json").write_text(json.dumps(config))
    torch.save(
        {"class_predictor.weight": torch.zeros(3, 256), "x": Subprocess(["touch", str(marker)])},
        hf_dir / "pytorch_model.bin",
    )
    with pytest.raises(UnsafeCheckpointError, match="refusing to load checkpoint"):
        model.load(hf_dir)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_plain_numpy_pickles_of_every_protocol_load(protocol):
    """The allow-list admits what numpy and the model zoo actually write (protocol 5: Python 3.14's default)."""
    weights = OrderedDict(
        a=np.arange(6, dtype=np.float32).reshape(2, 3),
        b=np.asfortranarray(np.ones((2, 3), dtype=np.float64)),
        c=np.array([1, 2], dtype=np.int64),
        d=np.float32(0.5),
    )
    out = load_pickle(pickle.dumps({"model": weights, "__author__": "x", "matching_heuristics": True}, protocol))
    assert list(out["model"]) == ["a", "b", "c", "d"]
    for key, value in weights.items():
        np.testing.assert_array_equal(out["model"][key], value)


def test_object_array_is_refused_with_a_clear_error(tmp_path):
    weights = {"sem_seg_head.predictor.query_feat.weight": np.array([1, "x"], dtype=object)}
    path = tmp_path / "objects.pkl"
    path.write_bytes(pickle.dumps({"model": weights}, protocol=2))
    with pytest.raises(ValueError, match=r"'sem_seg_head\.predictor\.query_feat\.weight' is a numpy array of object"):
        model.load(path)


def test_garbage_is_a_clear_error(tmp_path):
    (tmp_path / "junk.pkl").write_bytes(b"\x80\x02not a pickle at all")
    with pytest.raises(ValueError, match="not a readable pickle checkpoint"):
        model.load(tmp_path / "junk.pkl")
