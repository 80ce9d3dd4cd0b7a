"""data_prep: whole-slide images -> tissue masks -> regions at 20x -> ArrayRecord shards.

Modules: slide_io (reading at a target mpp), tissue (segmentation), regions (per-slide work),
records (shard schema), runner (process pool / Apache Beam), patches, features, tfds_builders,
synth (synthetic Aperio pyramids for tests and demos), cli (`hipt-prep`).
"""
