"""Weights by name: turn a `--model` value into a checkpoint `model.load` reads from the local disk.

- `zoo:NAME` (or a bare zoo name such as `coco-panoptic/swin-l`): the official file (`model.zoo`),
  downloaded like a URL and checked against the md5 prefix in its file name;
- `http(s)://...`: downloaded once into `M2F_CACHE` by `model.url_cache` (atomic, resumed when cut,
  a conditional request when cached, none offline: `M2F_OFFLINE=1` or `HF_HUB_OFFLINE=1`);
- `OWNER/NAME[@REVISION]` or `hf://OWNER/NAME[@REVISION]`: `huggingface_hub.snapshot_download` of the
  files `model.load` reads, into the standard Hugging Face cache (HF_HOME, HF_HUB_CACHE, HF_ENDPOINT and
  HF_TOKEN are huggingface_hub's business; we never store a token);
- anything else (local paths, s3://, "demo"): returned unchanged.

User errors (unknown name, missing repo, nothing cached while offline, checksum mismatch) are
ValueErrors with a one-line message.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from m2f.model import zoo
from m2f.model.url_cache import fetch_url, offline, sha256_file, unreachable_message

Kind = Literal["zoo", "url", "hub", "local"]
HUB_FILES = ["config.json", "model.safetensors", "pytorch_model.bin", "preprocessor_config.json"]
# organisation/model as on the Hugging Face hub, optionally @revision (branch, tag or commit)
HUB_ID = re.compile(r"^([A-Za-z0-9][\w.-]*/[\w.-]+)(?:@([\w./-]+))?$")
CHECKPOINT_SUFFIXES = (".safetensors", ".pkl", ".pth", ".pt", ".bin")


@dataclass(frozen=True)
class Resolved:
    source: str  # what the user named, canonical: "zoo:coco-panoptic/swin-l", the URL, "hf://owner/name"
    local: str  # what model.load reads: a file, a Hugging Face folder, or the unchanged value
    kind: Kind
    revision: str | None  # the hub commit the snapshot holds
    sha256: str | None  # of the checkpoint file (for a hub folder, of its weights file), as model.load reports it
    downloaded: bool  # bytes came over the network in this call
    preset: str | None = None  # for zoo entries: the model.presets name to pass to model.load(preset=)


def resolve(
    model: str, *, sha256: str | None = None, cache_dir: str | Path | None = None, retries: int = 3
) -> Resolved:
    """Where `model.load` finds the checkpoint `model` names, fetching it first if needed.

    `sha256` (optional) is the expected digest of a downloaded file; `cache_dir` overrides M2F_CACHE.
    """
    if model.startswith(zoo.ZOO_PREFIX) or (zoo.is_zoo_name(model) and not os.path.exists(model)):
        entry = zoo.find(model)
        name = zoo.ZOO_PREFIX + entry.name
        got = fetch_url(
            entry.url, sha256=sha256, md5_prefix=entry.md5_prefix, cache_dir=cache_dir, retries=retries, label=name
        )
        return Resolved(name, got.path, "zoo", None, got.sha256, got.downloaded, entry.preset)
    if model.startswith(("http://", "https://")):
        got = fetch_url(model, sha256=sha256, cache_dir=cache_dir, retries=retries)
        return Resolved(model, got.path, "url", None, got.sha256, got.downloaded)
    hub = hub_id(model)
    if hub is not None:
        return fetch_hub(hub[0], hub[1])
    return Resolved(model, model, "local", None, None, False)


def hub_id(model: str) -> tuple[str, str | None] | None:
    """(repo_id, revision) when `model` names a Hugging Face hub repo rather than a path.

    `hf://` always means the hub. A bare `owner/name` does only when no local path of that name exists
    and it does not end like a checkpoint file (".safetensors", ".pkl", ...).
    """
    if model.startswith("hf://"):
        match = HUB_ID.match(model.removeprefix("hf://"))
        if match is None:
            raise ValueError(f"{model!r} is not a Hugging Face hub id (hf://OWNER/NAME[@REVISION])")
        return match.group(1), match.group(2)
    if "://" in model or os.path.exists(model) or model.lower().endswith(CHECKPOINT_SUFFIXES):
        return None
    match = HUB_ID.match(model)
    return (match.group(1), match.group(2)) if match else None


def fetch_hub(repo_id: str, revision: str | None = None) -> Resolved:
    """The local snapshot folder of a hub repo (only the files model.load reads), via huggingface_hub."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    source = f"hf://{repo_id}" + (f"@{revision}" if revision else "")
    kwargs: dict[str, Any] = {}
    if os.environ.get("HF_ENDPOINT"):  # read now, not at huggingface_hub's import
        kwargs["endpoint"] = os.environ["HF_ENDPOINT"].rstrip("/")
    cache = _hf_cache_dir()
    blobs = Path(cache or _default_hf_cache()) / f"models--{repo_id.replace('/', '--')}" / "blobs"
    before = set(os.listdir(blobs)) if blobs.is_dir() else set()
    try:
        local = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=HUB_FILES,
            cache_dir=cache,
            local_files_only=offline(),
            **kwargs,
        )
    except RevisionNotFoundError:
        raise ValueError(f"Hugging Face hub repo {repo_id!r} has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise ValueError(
            f"{repo_id!r} is neither a local path nor a Hugging Face hub repo we can read "
            "(a private or gated repo needs HF_TOKEN)"
        ) from None
    except LocalEntryNotFoundError as e:
        why = (
            "offline mode is on and it is not in the Hugging Face cache"
            if offline()
            else f"the hub is unreachable ({e})"
        )
        raise ValueError(unreachable_message(source, why.splitlines()[0])) from None
    folder = Path(local)
    weights = next((folder / n for n in ("model.safetensors", "pytorch_model.bin") if (folder / n).exists()), None)
    if not (folder / "config.json").exists() or weights is None:
        raise ValueError(
            f"{source}: no config.json with model.safetensors or pytorch_model.bin; "
            "not a Hugging Face Mask2Former checkpoint (sharded weights are not supported)"
        )
    after = set(os.listdir(blobs)) if blobs.is_dir() else set()
    return Resolved(source, str(folder), "hub", folder.name, sha256_file(weights), after != before)


def _hf_cache_dir() -> str | None:
    """HF_HUB_CACHE, else HF_HOME/hub, as set now; None leaves huggingface_hub's own default."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return None


def _default_hf_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def download(name_or_url: str, dest_uri: str, storage_options: dict[str, Any] | None = None) -> Resolved:
    """Fetch a zoo name, URL or hub id, then copy it to any fsspec URI (for clusters without internet).

    A file goes to `dest_uri` itself when that ends with the file's suffix, else into it as a folder
    (keeping the name, whose suffix model.load needs); a hub snapshot's files go into `dest_uri` as a
    folder. Returns the resolution with `local` = the URI to pass as --model.
    """
    import fsspec

    got = resolve(name_or_url)
    if got.kind == "local":
        raise ValueError(f"{name_or_url!r} is not a zoo name, URL or hub id: nothing to download")
    fs, root = fsspec.core.url_to_fs(dest_uri, **(storage_options or {}))
    src = Path(got.local)
    if src.is_dir():
        pairs = [(f, f"{root.rstrip('/')}/{f.name}") for f in sorted(src.iterdir()) if f.name in HUB_FILES]
        dest = dest_uri.rstrip("/")
    elif dest_uri.endswith(src.suffix):
        pairs, dest = [(src, root)], dest_uri
    else:
        short = src.name.split("-", 1)[1]  # drop the cache's URL-hash prefix
        pairs, dest = [(src, f"{root.rstrip('/')}/{short}")], f"{dest_uri.rstrip('/')}/{short}"
    for local_file, target in pairs:
        _copy_to(fs, local_file, target)
    return replace(got, local=dest)


def _copy_to(fs: Any, local_file: Path, target: str) -> None:
    from fsspec.implementations.local import LocalFileSystem

    parent = target.rsplit("/", 1)[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if isinstance(fs, LocalFileSystem):  # aside, then rename: readers never see half a file
        tmp = f"{target}.part-{os.getpid()}"
        shutil.copyfile(local_file, tmp)
        os.replace(tmp, target)
    else:
        fs.put_file(str(local_file), target)  # one upload, completed (or not) as a whole on object stores


def pack(local: str) -> dict[str, bytes]:
    """A resolved checkpoint's bytes by file name, for `ray.put` on a driver whose disk workers cannot see.

    A file gives one entry; a Hugging Face folder gives the files model.load reads.
    """
    path = Path(local)
    if path.is_file():
        return {path.name: path.read_bytes()}
    files = {name: (path / name).read_bytes() for name in HUB_FILES if (path / name).is_file()}
    if "config.json" not in files:
        raise ValueError(f"{local}: neither a checkpoint file nor a folder with config.json")
    return files


def unpack(files: dict[str, bytes], cache_dir: str | Path) -> str:
    """Write `pack`'s output under `cache_dir` (once per content) and return what model.load reads."""
    if not files:
        raise ValueError("nothing to unpack")
    for name in files:
        if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith("."):
            raise ValueError(f"bad file name in a packed checkpoint: {name!r}")
    key = hashlib.sha256()
    for name in sorted(files):
        key.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    folder = Path(cache_dir) / "unpacked" / key.hexdigest()[:24]
    if not folder.exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
        try:
            for name, data in files.items():
                with open(tmp / name, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            os.rename(tmp, folder)  # fails when another process got there first: theirs is the same bytes
        except OSError:
            if not folder.exists():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    is_folder = len(files) > 1 or "config.json" in files
    return str(folder) if is_folder else str(folder / next(iter(files)))
