"""Where embed/'s image vectors are read from: its own parts, or the input they came from.

Precomputed embeddings are not copied into embed/ unless `embed.store_vectors` is set. Each part
then keeps its rows' `source` and `source_row`, and `embed/_vectors.json` says which file holds
each source's image vectors and which version of it embed read: its size, modification time
and content digest. Later stages read the image vectors from the input by ranges, on a local
disk or in an object store alike, and check that version before and after every read. A file
that changed after embed stops the stage with a message naming it; the next run embeds it
again (its digest is in embed's fingerprint), so a run never mixes two versions of a file.
Rows embed dropped are never read again: only the kept rows' positions are fetched.

Every reader gets the vectors exactly as a copy would hold them (normalised, rounded to
`embed.dtype`), so the coreset is the same with or without the copy. Image inputs always store
the vectors they compute.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from condense.cores.vectors import as_stored, normalize
from condense.errors import StageError
from condense.schema import IMG_EMB, SOURCE_ROW, vectors_to_arrow
from condense.storage.files import atomic_write_json, content_digest, read_json
from condense.storage.fs import filesystem, location
from condense.storage.parts import iter_row_groups, part_path, read_rows, read_table

VECTORS_RECORD = "_vectors.json"  # in embed/: where the image vectors are when not copied
NPY, PARQUET = "npy", "parquet"  # how a source holds them: an .npy file, an img_emb column


@dataclass(frozen=True)
class VectorFile:
    """An input file holding one source's image vectors, as embed read it."""

    path: str  # local path or URL
    kind: str  # NPY or PARQUET
    size: int  # bytes
    mtime: str
    digest: str  # content_digest: the store's ETag, or sha256 of the file or of 16 blocks


def file_version(path: str) -> tuple[int, str, str]:
    """A file's size, modification time and content digest, as they are now."""
    fs, inner = filesystem(path)
    info = fs.info(inner)
    size = int(info.get("size") or 0)
    mtime = str(info.get("mtime", info.get("LastModified", "")))
    return size, mtime, content_digest(fs, inner, size, info)


def vector_files(files: dict[str, tuple[str, str]]) -> dict[str, VectorFile]:
    """{source: VectorFile} for {source: (path, kind)}, their versions taken now (16 requests
    in flight: a store answers each with one HEAD)."""
    names = sorted(files)
    with ThreadPoolExecutor(max_workers=16) as pool:
        versions = list(pool.map(lambda s: file_version(files[s][0]), names))
    return {
        s: VectorFile(files[s][0], files[s][1], *version)
        for s, version in zip(names, versions, strict=True)
    }


def check_version(vf: VectorFile) -> None:
    """Stop when the file is not the version embed read."""
    try:
        now = file_version(vf.path)
    except FileNotFoundError:
        now = None
    if now != (vf.size, vf.mtime, vf.digest):
        what = "is gone" if now is None else "changed (size, modification time or content)"
        raise StageError(
            f"{vf.path} {what} since embed read it; its vectors are read in place, so the "
            "run stops rather than mix two versions: run it again, and embed reads the new file "
            "(or set embed.store_vectors: true to keep a copy in the run directory)"
        )


def write_vector_record(
    embed_dir, dtype: str, dim: int, parts: dict[str, str], files: dict[str, VectorFile]
) -> None:
    """embed/_vectors.json: each part's source, and each source's vector file."""
    atomic_write_json(
        location(embed_dir) / VECTORS_RECORD,
        {
            "dtype": dtype,
            "dim": dim,
            "parts": parts,
            "files": {s: vars(f) for s, f in files.items()},
        },
    )


@dataclass(frozen=True)
class EmbedVectors:
    """embed/'s image vectors, read from its parts or from the input (see the module's doc).
    Small and picklable: processors carry it to their workers."""

    embed_dir: str
    dtype: str = "float32"  # embed.dtype: how a copy would round them
    dim: int = 0
    parts: dict[str, str] | None = None  # part -> source; None: embed/ holds the vectors
    files: dict[str, VectorFile] | None = None  # source -> its vector file

    @classmethod
    def of(cls, embed_dir) -> EmbedVectors:
        """Where the run's embed/ keeps its image vectors."""
        record = read_json(location(embed_dir) / VECTORS_RECORD)
        if record is None:
            return cls(str(embed_dir))
        return cls(
            str(embed_dir),
            record["dtype"],
            int(record["dim"]),
            dict(record["parts"]),
            {s: VectorFile(**f) for s, f in record["files"].items()},
        )

    @property
    def stored(self) -> bool:
        """Whether embed/'s parts hold the vectors themselves."""
        return self.parts is None

    def read(self, part: str, columns: list[str], rows: np.ndarray | None = None) -> pa.Table:
        """These columns of one part, for all rows or the given positions in it; IMG_EMB
        among them comes from the input when embed/ holds no copy."""
        path = part_path(self.embed_dir, part)
        if self.stored:
            return read_table(path, columns) if rows is None else read_rows(path, rows, columns)
        others = [c for c in columns if c != IMG_EMB] + [SOURCE_ROW]
        refs = read_table(path, others) if rows is None else read_rows(path, rows, others)
        source_rows = refs.column(SOURCE_ROW).to_numpy()
        order = np.argsort(source_rows, kind="stable")
        vectors = np.empty((len(order), self.dim), dtype=self.dtype)
        vectors[order] = self._fetch(part, source_rows[order], check=True)
        return _with_vectors(refs, columns, vectors)

    def chunks(
        self, part: str, columns: list[str], rows: int
    ) -> Iterator[tuple[np.ndarray, pa.Table]]:
        """The part in chunks of about `rows` rows, each with its rows' positions in the part:
        its row groups in order when it holds the vectors, else runs of its source's rows
        (each one ranged read of the input)."""
        path = part_path(self.embed_dir, part)
        if self.stored:
            start = 0
            for group in iter_row_groups(path, columns):
                yield np.arange(start, start + len(group)), group
                start += len(group)
            return
        refs = read_table(path, [c for c in columns if c != IMG_EMB] + [SOURCE_ROW])
        source_rows = refs.column(SOURCE_ROW).to_numpy()
        order = np.argsort(source_rows, kind="stable")
        vf = self.files[self.parts[part]]
        if vf.kind == PARQUET:  # its row groups decode whole: each is read once, in one chunk
            rows = max(1, len(order))
        check_version(vf)
        for lo in range(0, len(order), rows):
            positions = order[lo : lo + rows]
            vectors = self._fetch(part, source_rows[positions], check=False)
            yield positions, _with_vectors(refs.take(pa.array(positions)), columns, vectors)
        check_version(vf)

    def _fetch(self, part: str, source_rows: np.ndarray, check: bool) -> np.ndarray:
        """The vectors at these rows (sorted) of the part's source, as a copy stores them."""
        from condense.readers.clip_retrieval import npy_take
        from condense.readers.parquet import parquet_take

        vf = self.files[self.parts[part]]
        if not len(source_rows):
            return np.zeros((0, self.dim), dtype=self.dtype)
        if check:
            check_version(vf)
        if vf.kind == NPY:
            raw = npy_take(vf.path, source_rows)
        else:
            raw = parquet_take(vf.path, source_rows, IMG_EMB, self.dim)
        if check:
            check_version(vf)
        return as_stored(normalize(raw), self.dtype)


def _with_vectors(refs: pa.Table, columns: list[str], vectors: np.ndarray) -> pa.Table:
    """`columns` of refs, with IMG_EMB (wherever it stands among them) made of `vectors`."""
    return pa.table(
        {c: vectors_to_arrow(vectors) if c == IMG_EMB else refs.column(c) for c in columns}
    )
