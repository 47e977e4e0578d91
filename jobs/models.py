"""`m2f models`: the official checkpoints by name (model.zoo), and `m2f models download` for clusters without
internet: fetch once where there is a network, copy to a URI every node reads, pass that as --model."""

from __future__ import annotations

import json
from typing import Any

from m2f.jobs.common.console import Console
from m2f.model import zoo
from m2f.pipeline.secrets import scrub, secret_values
from m2f.pipeline.storage import Storage

COLUMNS = ("name", "task", "dataset", "backbone", "queries", "metrics", "url")


def catalog() -> list[dict[str, Any]]:
    """Every zoo entry as a plain record (the `--json` form)."""
    return [
        {
            "name": entry.name,
            "task": entry.task,
            "dataset": entry.dataset,
            "backbone": entry.variant,
            "pretrain": entry.pretrain,
            "queries": entry.queries,
            "metrics": dict(entry.metrics),
            "preset": entry.preset,
            "url": entry.url,
        }
        for entry in zoo.entries()
    ]


def list_models(*, json_mode: bool) -> int:
    """Print the catalog: a table for people, or one JSON line (a list of records) for machines."""
    console = Console(json_mode=json_mode)
    records = catalog()
    if json_mode:
        console.result(json.dumps(records))
        return 0
    rows = [
        (r["name"], r["task"], r["dataset"], r["backbone"], str(r["queries"]), _metrics(r["metrics"]), r["url"])
        for r in records
    ]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(COLUMNS)]
    console.line("  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths, strict=True)).rstrip())
    for row in rows:
        console.line("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    console.line(
        f"{len(rows)} official checkpoints (Mask2Former's MODEL_ZOO.md; metrics as reported there). "
        "Use one as --model zoo:NAME (or NAME), or any http(s) URL or Hugging Face hub id."
    )
    return 0


def _metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.1f}" for name, value in metrics.items())


def download_model(name: str, dest: str, storage: Storage) -> int:
    """Fetch NAME (zoo name, URL or hub id) and copy it to DEST; print what to pass as --model. Exit 2 on a
    name that does not resolve, 3 when the copy fails."""
    from m2f.model.fetch import download

    console = Console()
    secrets = secret_values(storage.user_options)
    try:
        got = download(name, dest, storage.options(dest))
    except ValueError as e:
        console.line(f"error: {scrub(str(e), secrets)}", err=True)
        return 2
    except OSError as e:
        console.line(f"error: cannot write to {dest}: {scrub(str(e), secrets)}", err=True)
        return 3
    preset = f" --preset {got.preset}" if got.preset else ""
    console.line(f"copied {got.source} (sha256 {got.sha256 or 'unknown'}) to {got.local}")
    console.line(f"run it with: m2f segment INPUT OUTPUT --model {got.local}{preset}")
    return 0
