"""Evaluation metrics, one file per metric: panoptic quality, mIoU, COCO mask AP, and their tables.

Pure functions and small accumulators over numpy arrays and plain dicts. `m2f evaluate` streams
images through them one at a time, so memory stays flat however large the set, and each metric
can be checked on its own against a slow reference in the tests. Nothing here reads files or
knows about Ray or Parquet: the caller decodes the batch output and the ground truth.

- `panoptic_quality`: PQ / SQ / RQ as COCO panopticapi's ``pq_compute``.
- `confusion`: mIoU from a confusion matrix accumulated over the whole set.
- `coco_ap`: mask AP by pycocotools' ``COCOeval`` with ``iouType="segm"``, untouched.
- `id_map`: RLE segments painted into an id map, the input of PQ and mIoU.
- `table`: any of their summaries as terminal tables.
"""
