"""Hand-made ArrayRecord shards for tests (hipt-prep's own writers add status files and manifests)."""
from __future__ import annotations

from typing import Iterable

from data_prep import shards


def write_shard(path, records: Iterable[bytes]) -> str:
    """One shard of already encoded records (data_prep.shards: REGION.encode, encode_feature...)."""
    shards.write_shard(str(path), records)
    return str(path)
