"""Column names and Arrow types shared by every stage: the run directory's contract (DESIGN.md 3).

Stages name the columns they read and write through these constants, so a rename happens here
once and the pipeline can check each stage's inputs before it starts.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

SAMPLE_ID = "sample_id"
CAPTION = "caption"
URL = "url"
SOURCE = "source"  # where a row came from: the input file (or shard) it was read from
SOURCE_ROW = "source_row"  # its row in that file (embed/ keeping no copy: where its vectors are)
IMG_EMB = "img_emb"
TXT_EMB = "txt_emb"
CLIP_SCORE = "clip_score"
CLUSTER_ID = "cluster_id"
CENTROID_DIST = "centroid_dist"
CENTROID_COS = "centroid_cos"
COMPONENT_ID = "component_id"
COMPONENT_SIZE = "component_size"
KEPT = "kept"
MAX_SIM = "max_sim"  # highest similarity to another row of the same cluster (SemDeDup's score)
GROUP_ID = "group_id"  # truth.parquet (synth, the demo): the planted duplicate group (-1: none)

# Scratch files (removed when their stage is complete).
ROW = "row"  # a row's position in the part it came from
ORDER_KEY = "order_key"  # ranked stages: a row's uint64 order key

# export/shards/*.parquet, img2dataset's index of a shard.
KEY = "key"  # the sample's member name in its tar, without the extension
IMAGE_EXT = "image_ext"  # its image member's extension (jpg, png, webp)
STATUS = "status"  # img2dataset's download status ("success": every exported sample)

_FLOAT_TYPES = {"float16": pa.float16(), "float32": pa.float32()}


def embedding_type(dim: int, dtype: str) -> pa.DataType:
    """Arrow type of one stored embedding: a fixed-size list of `dim` non-null floats
    (non-null items spare Parquet readers the per-value definition levels)."""
    return pa.list_(pa.field("item", _FLOAT_TYPES[dtype], nullable=False), dim)


def embed_schema(dim: int, dtype: str, vectors: bool = True) -> pa.Schema:
    """Schema of `embed/part-*.parquet`: with the vectors, or (precomputed embeddings read in
    place) with each row's `source_row` instead."""
    vec = embedding_type(dim, dtype)
    where = (
        [pa.field(IMG_EMB, vec, nullable=False), pa.field(TXT_EMB, vec, nullable=False)]
        if vectors
        else [pa.field(SOURCE_ROW, pa.int64(), nullable=False)]
    )
    return pa.schema(
        [
            (SAMPLE_ID, pa.string()),
            (CAPTION, pa.string()),
            (URL, pa.string()),
            (SOURCE, pa.string()),
        ]
        + where
        + [(CLIP_SCORE, pa.float32())]
    )


CLUSTER_SCHEMA = pa.schema(
    [
        (SAMPLE_ID, pa.string()),
        (CLUSTER_ID, pa.int32()),
        (CENTROID_DIST, pa.float32()),
        (CENTROID_COS, pa.float32()),
    ]
)


def vectors_to_arrow(vectors: np.ndarray) -> pa.FixedSizeListArray:
    """Wrap an (n, d) float array as a fixed-size-list Arrow array without copying."""
    n, d = vectors.shape
    flat = pa.array(np.ascontiguousarray(vectors).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, type=embedding_type(d, str(vectors.dtype)))


def arrow_to_vectors(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Return an (n, d) numpy view of a fixed-size-list (or equal-length list) column."""
    if isinstance(column, pa.ChunkedArray):
        if column.num_chunks == 1:
            column = column.chunk(0)
        elif pa.types.is_fixed_size_list(column.type):
            # One memcpy per chunk (row group): far cheaper than Arrow's combine_chunks on lists.
            d = column.type.list_size
            pieces = [arrow_to_vectors(chunk) for chunk in column.chunks]
            return np.concatenate(pieces) if pieces else np.zeros((0, d), np.float32)
        else:
            column = column.combine_chunks()
    if pa.types.is_fixed_size_list(column.type):
        d = column.type.list_size
        values = column.flatten()  # honours the array's offset
        return values.to_numpy(zero_copy_only=False).reshape(-1, d)
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        lengths = pc_list_lengths(column)
        if len(lengths) and (lengths.min() != lengths.max()):
            raise ValueError(
                f"embedding rows have different lengths ({lengths.min()}..{lengths.max()})"
            )
        d = int(lengths[0]) if len(lengths) else 0
        return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, d)
    raise TypeError(f"expected a list column of floats, got {column.type}")


def pc_list_lengths(column: pa.Array) -> np.ndarray:
    import pyarrow.compute as pc

    return pc.list_value_length(column).to_numpy(zero_copy_only=False)


SHARD_INDEX_SCHEMA = pa.schema(
    [
        (KEY, pa.string()),
        (SAMPLE_ID, pa.string()),
        (URL, pa.string()),
        (CAPTION, pa.string()),
        (SOURCE, pa.string()),
        (IMAGE_EXT, pa.string()),
        (STATUS, pa.string()),
    ]
)
