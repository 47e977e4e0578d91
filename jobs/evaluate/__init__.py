"""`m2f evaluate` (`job.run(config)`) and `m2f export-coco` (`export_coco.export_coco`), over a segment OUTPUT."""
