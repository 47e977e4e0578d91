"""The index page of a run's previews: one static, self-contained HTML file listing each preview with its
image URI and a table of its segments."""

from __future__ import annotations

import html
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from m2f.pipeline.preview.picture import segment_colour


@dataclass(frozen=True)
class PreviewEntry:
    """One image on the index page: its preview (`png` None when there is none, `note` says why)."""

    uri: str
    image_id: str
    png: str | None = None
    size: tuple[int, int] | None = None  # (w, h) of the PNG
    source_size: tuple[int, int] | None = None  # (w, h) of the image
    segments: list[Mapping[str, Any]] = field(default_factory=list)
    about: str = ""  # model, task, run
    note: str = ""


_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px; background: #f4f4f4; color: #1d1d1d; }
h1 { font-size: 20px; margin: 0 0 4px; }
section { background: #fff; border: 1px solid #d8d8d8; border-radius: 6px; padding: 16px; margin: 0 0 20px; }
h2 { font-size: 15px; margin: 0 0 4px; word-break: break-all; }
.uri { font-family: ui-monospace, monospace; word-break: break-all; margin: 0 0 2px; }
.about, .note { color: #555; margin: 0 0 12px; }
.body { display: flex; flex-wrap: wrap; gap: 20px; align-items: flex-start; }
img { max-width: 100%; height: auto; display: block; }
table { border-collapse: collapse; }
th, td { padding: 2px 10px; border-bottom: 1px solid #e6e6e6; text-align: left; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.swatch { display: inline-block; width: 10px; height: 10px; margin-right: 6px; vertical-align: baseline; }
"""


_DOT = " \u00b7 "


def _segment_table(segments: Sequence[Mapping[str, Any]]) -> str:
    rows = []
    for s in sorted(segments, key=lambda s: (-int(s.get("area") or 0), int(s["id"]))):
        r, g, b = segment_colour(int(s["id"]))
        score = s.get("score")
        rows.append(
            f'<tr><td><span class="swatch" style="background:#{r:02x}{g:02x}{b:02x}"></span>'
            f"{html.escape(str(s['label']))}</td>"
            f'<td class="num">{"" if score is None else f"{float(score):.3f}"}</td>'
            f'<td class="num">{int(s.get("area") or 0):,}</td></tr>'
        )
    if not rows:
        rows.append('<tr><td colspan="3">no segments</td></tr>')
    return (
        f"<table><caption>{len(segments)} segment{'' if len(segments) == 1 else 's'}</caption>"
        '<thead><tr><th>label</th><th class="num">score</th><th class="num">area (px)</th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def index_html(entries: Sequence[PreviewEntry], *, output: str = "") -> str:
    """A self-contained page (inline CSS, no scripts, no external URLs) listing each entry: its preview
    (a relative link), its image URI and a table of its segments (label, score, area), largest first."""
    shown = sum(e.png is not None for e in entries)
    parts = [
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n',
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n',
        f"<title>m2f previews{' - ' + html.escape(output) if output else ''}</title>\n",
        f"<style>{_STYLE}</style>\n</head>\n<body>\n<h1>m2f previews</h1>\n",
        f'<p class="about">{shown} of {len(entries)} image{"" if len(entries) == 1 else "s"}',
        f" from <code>{html.escape(output)}</code>" if output else "",
        "</p>\n",
    ]
    for e in entries:
        parts.append(f'<section id="img-{html.escape(e.image_id)}">\n')
        title = e.png or posixpath.basename(e.uri.rstrip("/")) or e.image_id
        parts.append(f'<h2>{html.escape(title)}</h2>\n<p class="uri">{html.escape(e.uri)}</p>\n')
        about = [f"{e.source_size[0]}\u00d7{e.source_size[1]} px"] if e.source_size else []
        about += [e.about] if e.about else []
        if about:
            parts.append(f'<p class="about">{html.escape(_DOT.join(about))}</p>\n')
        if e.png is None:
            parts.append(f'<p class="note">no preview: {html.escape(e.note)}</p>\n</section>\n')
            continue
        href = quote(e.png)
        dims = f' width="{e.size[0]}" height="{e.size[1]}"' if e.size else ""
        parts.append(
            f'<div class="body"><a href="{href}"><img src="{href}"{dims} alt="overlay of '
            f'{html.escape(e.uri)}"></a>\n{_segment_table(e.segments)}</div>\n</section>\n'
        )
    parts.append("</body>\n</html>\n")
    return "".join(parts)
