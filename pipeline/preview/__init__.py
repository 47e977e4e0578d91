"""Previews of a finished run that people can find and read: overlay PNGs and an index page.

Each preview is the image with every segment's mask tinted in its own colour, "label score" tags placed
where they neither leave the picture nor cover one another, and a legend strip below the picture naming
the classes shown. `write_previews` writes them to `OUTPUT/_previews/<stem>-<image_id>.png` and
`OUTPUT/_previews/index.html`, a static page listing each preview with its image URI and a table of its
segments.

- `picture`: the overlay, the legend and the whole preview (`render_preview`), pure.
- `labels`: where the tags go (`place_labels`, `label_spots`), pure, and drawing them.
- `index_page`: the HTML page (`index_html`), pure.
- `write`: choosing rows (`pick_rows`) and writing the files (`write_previews`), which read the dataset.
"""

from m2f.pipeline.preview.index_page import PreviewEntry, index_html
from m2f.pipeline.preview.labels import FONT_SIZE, label_spots, place_labels
from m2f.pipeline.preview.picture import (
    ALPHA,
    BACKGROUND,
    LEGEND_MIN_WIDTH,
    LEGEND_SWATCHES,
    MAX_SIDE,
    MIN_SHORT_SIDE,
    legend_entries,
    png_bytes,
    preview_size,
    render_legend,
    render_overlay,
    render_preview,
    segment_colour,
)
from m2f.pipeline.preview.write import MAX_STEM, pick_rows, preview_name, write_previews

__all__ = [
    "ALPHA",
    "BACKGROUND",
    "FONT_SIZE",
    "LEGEND_MIN_WIDTH",
    "LEGEND_SWATCHES",
    "MAX_SIDE",
    "MAX_STEM",
    "MIN_SHORT_SIDE",
    "PreviewEntry",
    "index_html",
    "label_spots",
    "legend_entries",
    "pick_rows",
    "place_labels",
    "png_bytes",
    "preview_name",
    "preview_size",
    "render_legend",
    "render_overlay",
    "render_preview",
    "segment_colour",
    "write_previews",
]
