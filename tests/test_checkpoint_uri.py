"""`model.load` reads any fsspec URI: checkpoints on a real (moto) S3 server give the same logits as local."""

from __future__ import annotations

import pytest
import torch

from m2f import model
from tests.hf_models import tiny_hf_model


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """A Hugging Face directory and our own single-file format of the same weights, on local disk."""
    root = tmp_path_factory.mktemp("uri")
    tiny_hf_model("resnet").save_pretrained(root / "hf")
    m = model.load(str(root / "hf"))
    digest = model.save(m, root / "own.safetensors")
    torch.manual_seed(4)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        out = m(x)
    return root, x, out, digest


def same_logits(m: model.Mask2Former, x: torch.Tensor, want: model.Mask2FormerOutput) -> None:
    with torch.no_grad():
        got = m(x)
    assert torch.equal(got.class_logits, want.class_logits)
    assert torch.equal(got.mask_logits, want.mask_logits)


def test_hf_directory_from_s3(local, s3_bucket, s3_fs, s3_options):
    root, x, want, _ = local
    s3_fs.put(str(root / "hf"), f"{s3_bucket}/models/hf", recursive=True)
    assert sorted(p.rsplit("/", 1)[-1] for p in s3_fs.ls(f"{s3_bucket}/models/hf")) == [
        "config.json",
        "model.safetensors",
    ]
    m = model.load(f"s3://{s3_bucket}/models/hf", storage_options=s3_options)
    same_logits(m, x, want)
    assert m.config == model.load(str(root / "hf")).config
    m = model.load(f"s3://{s3_bucket}/models/hf/", storage_options=s3_options)  # a trailing slash too
    same_logits(m, x, want)


def test_own_format_from_s3(local, s3_bucket, s3_fs, s3_options):
    root, x, want, digest = local
    s3_fs.put(str(root / "own.safetensors"), f"{s3_bucket}/own.safetensors")
    m = model.load(f"s3://{s3_bucket}/own.safetensors", storage_options=s3_options)
    same_logits(m, x, want)
    assert m.checkpoint_sha256 == digest

    # model.save writes to the same URIs
    written = model.save(m, f"s3://{s3_bucket}/copies/again.safetensors", storage_options=s3_options)
    assert written == digest
    same_logits(model.load(f"s3://{s3_bucket}/copies/again.safetensors", storage_options=s3_options), x, want)


def test_missing_uri_is_file_not_found(s3_bucket, s3_options, tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        model.load(f"s3://{s3_bucket}/nothing/here.safetensors", storage_options=s3_options)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        model.load(f"s3://{s3_bucket}/no-such-dir", storage_options=s3_options)
    with pytest.raises(FileNotFoundError):
        model.load(tmp_path / "absent.pkl")
    with pytest.raises(FileNotFoundError):
        model.load(f"file://{tmp_path}/absent.safetensors")


def test_save_is_byte_for_byte_deterministic(local, tmp_path):
    """Equal models give equal files (and sha256), whatever order safetensors lists the metadata in."""
    root, x, want, digest = local
    m = model.load(root / "own.safetensors")
    digests = {model.save(m, tmp_path / f"copy{i}.safetensors") for i in range(3)}
    assert digests == {digest}
    assert len({(tmp_path / f"copy{i}.safetensors").read_bytes() for i in range(3)}) == 1
    same_logits(model.load(tmp_path / "copy0.safetensors"), x, want)
