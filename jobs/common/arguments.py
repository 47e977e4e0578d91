"""Arguments bounded and named: the checks every command runs on what it was given, before Ray starts.

Each raises ValueError with one short line that names the option (INPUT, --model, ...) and never echoes a
long value or a credential: a value over its limit is described by its length, a URI with user-info is
shown with it replaced by "***", and anything else quoted is shortened to SHOWN_CHARS. The limits live in
common/configs.py (LIMITS, MAX_STRING_CHARS, ...), where the README's table comes from.
"""

from __future__ import annotations

import errno
import os
import sys
import tempfile
from collections.abc import Mapping

from m2f.jobs.common.configs import MAX_STORAGE_OPTIONS_CHARS, MAX_STRING_CHARS, number
from m2f.pipeline.paths import is_filesystem_root, normalised
from m2f.pipeline.secrets import has_userinfo, without_userinfo
from m2f.pipeline.storage import Storage, protocol_of

SHOWN_CHARS = 100  # the most of a value a message quotes
NO_CREDENTIALS_IN_URIS = (
    "give credentials in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN) or in "
    "--storage-options, never in a URI"
)


def shown(value: str) -> str:
    """`value` for a message: as it is up to SHOWN_CHARS, else its start and end around "..."."""
    if len(value) <= SHOWN_CHARS:
        return value
    return f"{value[: SHOWN_CHARS - 30]}...{value[-20:]} ({len(value)} characters)"


def check_text(named: Mapping[str, str | None], storage_options_json: str | None = None) -> None:
    """Refuse a string option over MAX_STRING_CHARS, or holding a control character (a newline would
    split the one line of every message that quotes it); --storage-options over MAX_STORAGE_OPTIONS_CHARS.
    `named`: option name as the user knows it ("INPUT", "--model") -> value (None: not given)."""
    if storage_options_json is not None and len(storage_options_json) > MAX_STORAGE_OPTIONS_CHARS:
        raise ValueError(
            f"--storage-options is {len(storage_options_json)} characters long; the most is {MAX_STORAGE_OPTIONS_CHARS}"
        )
    for name, value in named.items():
        if value is None:
            continue
        if len(value) > MAX_STRING_CHARS:
            raise ValueError(f"{name} is {len(value)} characters long; the most is {MAX_STRING_CHARS}")
        bad = next((i for i, c in enumerate(value) if ord(c) < 0x20 or ord(c) == 0x7F), None)
        if bad is not None:
            raise ValueError(f"{name} holds a control character (U+{ord(value[bad]):04X}) at position {bad + 1}")


def checked_storage(endpoint_url: str | None, storage_options_json: str | None) -> Storage:
    """The Storage for --endpoint-url and --storage-options, checked (`check_text`) and parsed; ValueError
    for malformed options, its message never echoing the JSON (which may hold a secret)."""
    check_text({"--endpoint-url": endpoint_url}, storage_options_json)
    return Storage.from_cli(endpoint_url, storage_options_json)


def check_no_userinfo(named: Mapping[str, str | None]) -> None:
    """Refuse a URI with user-info (`s3://user:pass@host/...`): a credential on a command line ends up in
    shell histories, process lists and schedulers' logs. Shown with the user-info as "***"."""
    for name, uri in named.items():
        if uri is not None and has_userinfo(uri):
            raise ValueError(f"{name} {shown(without_userinfo(uri))} holds credentials: {NO_CREDENTIALS_IN_URIS}")


def check_uris(named: Mapping[str, str | None]) -> None:
    """`check_text` and `check_no_userinfo` for the URIs of a command (train, evaluate, export-coco)."""
    check_text(named)
    check_no_userinfo(named)


def check_output_place(input: str, output: str) -> None:
    """Refuse OUTPUT at a filesystem root (`/`, `file:///`, `C:\\`, `~` where home is `/`; a bucket is
    fine), and OUTPUT that is INPUT (in any spelling) unless INPUT is a manifest file: rows, reports and
    previews would land among the images, and a re-run would list them."""
    if is_filesystem_root(output):
        where = f" ({normalised(output)})" if normalised(output) != output else ""
        raise ValueError(f"OUTPUT {shown(output)}{where} is the root of a filesystem; give OUTPUT a folder of its own")
    if normalised(input) == normalised(output) and not _manifest_file(input):
        raise ValueError(f"OUTPUT is INPUT: {shown(output)}; give OUTPUT a folder or prefix of its own")


def _manifest_file(input: str) -> bool:
    """Whether INPUT names a manifest file (its images live elsewhere): by its name, and for a local
    .parquet, by being a file (a folder of that name is a Parquet dataset, which OUTPUT must not join)."""
    from m2f.pipeline.sources import MANIFEST_SUFFIXES  # here: sources imports pyarrow

    name = input.rstrip("/").lower()
    if not name.endswith(MANIFEST_SUFFIXES):
        return False
    return (
        not name.endswith(".parquet")
        or protocol_of(input) not in ("file", "local")
        or os.path.isfile(normalised(input))
    )


def local_resources(device: str, gpus_per_actor: float) -> tuple[float, float]:
    """(CPUs, GPUs) of the Ray a run without --ray-address will use: the Ray already running in this
    process (tests, notebooks, bench), else this machine's, as a local `ray.init()` counts them
    (os.cpu_count(); a container's CPU quota can only lower Ray's count, so no run Ray holds is refused).
    GPUs are counted (torch) only where the actors may take one."""
    ray = sys.modules.get("ray")  # never imported here: importing Ray takes seconds
    if ray is not None and ray.is_initialized():
        resources = ray.cluster_resources()
        return float(resources.get("CPU", 0.0)), float(resources.get("GPU", 0.0))
    gpus = 0.0
    if device != "cpu" and gpus_per_actor > 0:
        import torch

        gpus = float(torch.cuda.device_count())
    return float(os.cpu_count() or 1), gpus


def check_local_capacity(
    *, actors: int, cpus_per_actor: float, gpus_per_actor: float, device: str, cpus: float, gpus: float
) -> None:
    """Refuse an actor pool that a local Ray of `cpus` CPUs and `gpus` GPUs cannot run: the actors must
    leave one CPU for reading, decoding and encoding (else nothing feeds them and the run stalls), and
    actors on GPUs (`cuda`, or `auto` where there is a GPU) must fit the GPUs."""
    slack = 1e-4  # Ray counts resources in units of 1/10000
    if device == "cuda" and gpus <= 0:
        raise ValueError("--device cuda, but this machine has no GPU that torch can use (Ray runs locally)")
    if actors * cpus_per_actor > cpus - 1 + slack:
        raise ValueError(
            f"--actors {actors} x --cpus-per-actor {number(cpus_per_actor)} leave none of this machine's "
            f"{number(cpus)} CPUs for reading and decoding: lower them, or join a cluster with --ray-address"
        )
    on_gpus = device == "cuda" or (device == "auto" and gpus > 0)
    if on_gpus and actors * gpus_per_actor > gpus + slack:
        raise ValueError(
            f"--actors {actors} x --gpus-per-actor {number(gpus_per_actor)} need more than this machine's "
            f"{number(gpus)} GPUs: lower them, or join a cluster with --ray-address"
        )


def probe_local_output(output: str) -> None:
    """Refuse a local OUTPUT this process cannot write to, naming OUTPUT and the cause; leaves nothing.

    Probed by doing, not by permission bits (which say nothing to root, and /proc refuses even root): a
    temporary folder is made and removed in the nearest existing folder at or above OUTPUT. An OUTPUT
    that is a file is left to the job's own message; URIs are left to the first write, which names OUTPUT.
    """
    if protocol_of(output) not in ("file", "local"):
        return
    path = existing = normalised(output)
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if existing == path and not os.path.isdir(path):
        return
    if not os.path.isdir(existing):
        raise ValueError(f"cannot write to OUTPUT {shown(output)}: {shown(existing)} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".m2f-probe-", dir=existing))
    except OSError as e:
        raise ValueError(f"cannot write to OUTPUT {shown(output)}: {_os_reason(e, existing)}") from None


def _os_reason(e: OSError, folder: str) -> str:
    if e.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if e.errno == errno.EROFS:
        return "read-only file system"
    if e.errno == errno.ENOENT:  # a folder that exists but takes no new entries (/proc, /sys)
        return f"no folder can be made in {shown(folder)}"
    return (e.strerror or type(e).__name__).lower()
