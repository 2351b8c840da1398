"""The RoI feature cache (HDF5): schema, writer, reader, summary.

:mod:`crat_ft.cache.schema` is the one owner of the layout; the other modules
write (:mod:`~crat_ft.cache.writer`), read (:mod:`~crat_ft.cache.reader`) and
describe (:mod:`~crat_ft.cache.summary`) files of that layout. The public names
of all four are importable from here.
"""

from crat_ft.cache.reader import RoIReader, cache_identity
from crat_ft.cache.schema import (
    FORMAT_NAME,
    FORMAT_VERSION,
    IMAGE_FIELDS,
    INDEX_FILE,
    MASK_FIELDS,
    REQUIRED_ATTRS,
    ROI_FIELDS,
    ROI_META_BYTES,
    ImageBlock,
    base_attrs,
    cache_meta,
    config_hash,
    open_cache,
    pack_masks,
    shard_name,
    stage_dir,
    stage_indexes,
    unpack_masks,
)
from crat_ft.cache.summary import summarize
from crat_ft.cache.writer import CacheWriter, build_index

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "IMAGE_FIELDS",
    "INDEX_FILE",
    "MASK_FIELDS",
    "REQUIRED_ATTRS",
    "ROI_FIELDS",
    "ROI_META_BYTES",
    "CacheWriter",
    "ImageBlock",
    "RoIReader",
    "base_attrs",
    "build_index",
    "cache_identity",
    "cache_meta",
    "config_hash",
    "open_cache",
    "pack_masks",
    "shard_name",
    "stage_dir",
    "stage_indexes",
    "summarize",
    "unpack_masks",
]
