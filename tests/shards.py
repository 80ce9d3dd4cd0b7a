"""Hand-made ArrayRecord shards for tests (hipt-prep's own writers add tmp + rename + status)."""
from __future__ import annotations

import os
from typing import Iterable


def write_shard(path, records: Iterable[bytes]) -> str:
    """One ArrayRecord file of already packed records (data_prep.records.*_record)."""
    from array_record.python import array_record_module

    path = str(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
    for record in records:
        writer.write(record)
    writer.close()
    return path
