"""Where a path or URI points, in one normal form, for comparing locations: is OUTPUT INPUT, is a file
under OUTPUT, is OUTPUT a filesystem root. Pure: no filesystem is touched (only the working folder and
the home folder are read, to make a local path absolute).

- local paths (plain, `file://`, `local://`) become absolute: `~` expanded, `.`/`..` and repeated or
  trailing slashes gone; `C:\\` style paths are normalised as Windows paths;
- URIs become `scheme://rest`: the scheme lower-case, the slashes around `rest` gone (`s3://bucket/`
  and `s3://bucket` are one place). Keys are compared as written: an object store's `a//b` is its own key.
"""

from __future__ import annotations

import ntpath
import os
import re

LOCAL_SCHEMES = frozenset({"file", "local"})
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$", re.DOTALL)
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")


def normalised(uri: str) -> str:
    """The one spelling of the place `uri` names (see the module docstring)."""
    text = uri.strip()
    match = _SCHEME.match(text)
    if match and match.group(1).lower() not in LOCAL_SCHEMES:
        return f"{match.group(1).lower()}://{match.group(2).strip('/')}"
    path = match.group(2) if match else text.removeprefix("file:")
    if _WINDOWS_DRIVE.match(path):
        return ntpath.normpath(path)
    absolute = os.path.normpath(os.path.abspath(os.path.expanduser(path)))
    return "/" + absolute.lstrip("/") if absolute.startswith("//") else absolute  # POSIX keeps "//x"; fsspec not


def same_or_under(path: str, root: str) -> bool:
    """Whether `path` is `root` or lies under it, each in any spelling `normalised` accepts:
    `same_or_under("/data/out/part-1.parquet", "file:///data/out/")` is True, and
    `same_or_under("s3://b/outputs", "s3://b/out")` is False (a sibling sharing a prefix)."""
    p, r = normalised(path), normalised(root)
    if p == r:
        return True
    separator = "\\" if _WINDOWS_DRIVE.match(r) else "/"
    return p.startswith(r.rstrip(separator) + separator)


def is_filesystem_root(uri: str) -> bool:
    """Whether `uri` is the root of a whole filesystem: `/`, `file:///`, `~` where home is `/`, `C:\\`,
    or a scheme with nothing after it (`s3://`). A bucket (`s3://bucket`) is not: it is a normal output."""
    n = normalised(uri)
    match = _SCHEME.match(n)
    if match:
        return not match.group(2)
    module = ntpath if _WINDOWS_DRIVE.match(n) else os.path
    return module.dirname(n) == n
