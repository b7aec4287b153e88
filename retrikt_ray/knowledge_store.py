"""The knowledge store (docs/method.md, stage 4): generated rows, their teacher soft labels, and a FAISS
index over L2-normalised student-embedding keys, searched by inner product (= cosine).

Keys are tied to the encoder weights that made them through `encoder_fingerprint`; when the encoder
changes, `with_keys` gives the same rows with fresh keys and a rebuilt index.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

INDEX_KINDS = ("flat", "hnsw", "ivfpq")
HNSW_EF_SEARCH = 64  # lower bound of the HNSW candidate list; raised to the number of results asked for
IVF_NPROBE = 32  # inverted lists visited per IVF-PQ query


@dataclass(eq=False)
class KnowledgeStore:
    """Rows of the store, their keys, and a lazily built FAISS index over the keys."""

    inputs: list[tuple[str, str | None]]
    labels: np.ndarray
    soft_labels: np.ndarray
    keys: np.ndarray
    teacher_states: np.ndarray | None
    encoder_fingerprint: str
    example_ids: np.ndarray | None = None
    index_kind: str = "flat"
    _index: faiss.Index | None = field(default=None, init=False, repr=False)
    _index_options: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        self.inputs = [(text_a, text_b) for text_a, text_b in self.inputs]
        rows = len(self.inputs)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(rows)
        self.soft_labels = np.ascontiguousarray(self.soft_labels, dtype=np.float32)
        self.keys = np.ascontiguousarray(self.keys, dtype=np.float32)
        if self.teacher_states is not None:
            self.teacher_states = np.ascontiguousarray(self.teacher_states, dtype=np.float32)
        if self.example_ids is None:
            self.example_ids = np.arange(rows, dtype=np.int64)
        self.example_ids = np.asarray(self.example_ids, dtype=np.int64).reshape(rows)
        for name in ("soft_labels", "keys", "teacher_states"):
            array = getattr(self, name)
            if array is not None and (array.ndim != 2 or array.shape[0] != rows):
                raise ValueError(f"KnowledgeStore.{name}: expected {rows} rows (2-D), got shape {array.shape}")
        if self.index_kind not in INDEX_KINDS:
            raise ValueError(f"KnowledgeStore.index_kind: expected one of {INDEX_KINDS}, got {self.index_kind!r}")
        self._index_options = {"kind": self.index_kind}

    # ------------------------------------------------------------------------------------ shape
    def __len__(self) -> int:
        return len(self.inputs)

    @property
    def dim(self) -> int:
        return self.keys.shape[1]

    @property
    def num_labels(self) -> int:
        return self.soft_labels.shape[1]

    @property
    def version(self) -> str:
        """Short content hash of keys, soft labels and labels."""
        digest = hashlib.sha256()
        for array in (self.keys, self.soft_labels, self.labels):
            digest.update(str(array.shape).encode())
            digest.update(array.tobytes())
        return digest.hexdigest()[:16]

    # ------------------------------------------------------------------------------------ index
    @property
    def index(self) -> faiss.Index:
        if self._index is None:
            self.build_index(**self._index_options)
        return self._index

    def build_index(
        self,
        kind: str = "auto",
        exact_max_rows: int = 200_000,
        hnsw_m: int = 32,
        ivf_lists: int = 1024,
        pq_subquantizers: int = 16,
    ) -> None:
        """Build the inner-product index; `auto` is exact up to `exact_max_rows` rows, HNSW above.

        IVF-PQ adapts its sizes to small stores: at most rows/39 lists (FAISS's minimum of training
        points per centroid), a number of sub-quantizers that divides the dimension, and codes of at
        most log2(rows) bits (k-means cannot train more centroids than points).
        """
        options = dict(
            kind=kind,
            exact_max_rows=exact_max_rows,
            hnsw_m=hnsw_m,
            ivf_lists=ivf_lists,
            pq_subquantizers=pq_subquantizers,
        )
        rows, dim = self.keys.shape
        if kind == "auto":
            kind = "flat" if rows <= exact_max_rows else "hnsw"
        if kind == "flat":
            index = faiss.IndexFlatIP(dim)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        elif kind == "ivfpq":
            if rows < 2:
                raise ValueError(f"an IVF-PQ index needs at least 2 rows to train, the store has {rows}")
            nlist = max(1, min(ivf_lists, rows // 39))
            subquantizers = max(m for m in range(1, min(pq_subquantizers, dim) + 1) if dim % m == 0)
            nbits = min(8, int(np.log2(rows)))
            quantizer = faiss.IndexFlatIP(dim)
            index = faiss.IndexIVFPQ(quantizer, dim, nlist, subquantizers, nbits, faiss.METRIC_INNER_PRODUCT)
            index.train(self.keys)
        else:
            raise ValueError(f"index kind: expected auto or one of {INDEX_KINDS}, got {kind!r}")
        index.add(self.keys)
        self._index = index
        self.index_kind = kind
        self._index_options = options

    def search(self, queries: np.ndarray, k: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows by inner product: (scores (Q, k) float32, ids (Q, k) int64), best first.

        `exclude` holds one row id per query (-1: none) that must not be returned, e.g. the query's own
        row. Missing results (fewer than k rows) are padded with id -1 and score -inf.
        """
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries: expected shape (Q, {self.dim}), got {queries.shape}")
        wanted = k + (exclude is not None)
        index = self.index
        if self.index_kind == "hnsw":
            index.hnsw.efSearch = max(HNSW_EF_SEARCH, wanted)
        elif self.index_kind == "ivfpq":
            index.nprobe = min(index.nlist, IVF_NPROBE)
        scores, ids = index.search(queries, wanted)
        ids = ids.astype(np.int64)
        if self.index_kind == "ivfpq":
            scores, ids = self._rescore(queries, ids)
        scores = np.where(ids >= 0, scores, -np.inf).astype(np.float32)
        if exclude is not None:
            scores, ids = _drop_excluded(scores, ids, np.asarray(exclude, dtype=np.int64).reshape(len(queries)))
        return scores, ids

    def _rescore(self, queries: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact inner products for the candidates, reordered: IVF-PQ scores are code approximations."""
        exact = np.einsum("qd,qkd->qk", queries, self.keys[np.maximum(ids, 0)])
        exact = np.where(ids >= 0, exact, -np.inf)
        order = np.argsort(-exact, axis=1, kind="stable")
        return np.take_along_axis(exact, order, axis=1), np.take_along_axis(ids, order, axis=1)

    # ------------------------------------------------------------------------------- new stores
    def with_keys(self, keys: np.ndarray, encoder_fingerprint: str) -> KnowledgeStore:
        """The same rows with keys from another encoder; the index is rebuilt with the same options."""
        store = replace(self, keys=keys, encoder_fingerprint=encoder_fingerprint)
        store.build_index(**self._index_options)
        return store

    def subset(self, row_ids) -> KnowledgeStore:
        """The selected rows (in the given order), with an index rebuilt with the same options."""
        row_ids = np.asarray(row_ids, dtype=np.int64)
        store = KnowledgeStore(
            inputs=[self.inputs[i] for i in row_ids],
            labels=self.labels[row_ids],
            soft_labels=self.soft_labels[row_ids],
            keys=self.keys[row_ids],
            teacher_states=None if self.teacher_states is None else self.teacher_states[row_ids],
            encoder_fingerprint=self.encoder_fingerprint,
            example_ids=self.example_ids[row_ids],
            index_kind=self.index_kind,
        )
        store.build_index(**self._index_options)
        return store

    def appended(self, rows: KnowledgeStore) -> KnowledgeStore:
        """These rows, then `rows` (keys from the same encoder), with an index rebuilt with the same options;
        the new rows' example ids follow this store's."""
        if rows.encoder_fingerprint != self.encoder_fingerprint:
            raise ValueError(
                f"the new rows' keys come from encoder {rows.encoder_fingerprint}, this store's from "
                f"{self.encoder_fingerprint}"
            )
        if (rows.teacher_states is None) != (self.teacher_states is None):
            raise ValueError("the new rows and the store do not both hold teacher states")
        first_id = int(self.example_ids.max()) + 1 if len(self) else 0
        store = KnowledgeStore(
            inputs=self.inputs + rows.inputs,
            labels=np.concatenate([self.labels, rows.labels]),
            soft_labels=np.concatenate([self.soft_labels, rows.soft_labels]),
            keys=np.concatenate([self.keys, rows.keys]),
            teacher_states=None
            if self.teacher_states is None
            else np.concatenate([self.teacher_states, rows.teacher_states]),
            encoder_fingerprint=self.encoder_fingerprint,
            example_ids=np.concatenate([self.example_ids, rows.example_ids - rows.example_ids.min() + first_id])
            if len(rows)
            else self.example_ids,
            index_kind=self.index_kind,
        )
        store.build_index(**self._index_options)
        return store

    # ---------------------------------------------------------------------------------- on disk
    def save(self, folder) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        soft = pa.FixedSizeListArray.from_arrays(pa.array(self.soft_labels.reshape(-1)), self.num_labels)
        table = pa.table(
            {
                "text_a": pa.array([text_a for text_a, _ in self.inputs], type=pa.string()),
                "text_b": pa.array([text_b for _, text_b in self.inputs], type=pa.string()),
                "label": pa.array(self.labels),
                "soft_label": soft,
                "example_id": pa.array(self.example_ids),
            }
        )
        pq.write_table(table, folder / "rows.parquet")
        np.save(folder / "keys.npy", self.keys)
        if self.teacher_states is not None:
            np.save(folder / "teacher_states.npy", self.teacher_states)
        faiss.write_index(self.index, str(folder / "index.faiss"))
        meta = {
            "rows": len(self),
            "dim": self.dim,
            "num_labels": self.num_labels,
            "index_kind": self.index_kind,
            "index_options": self._index_options,
            "encoder_fingerprint": self.encoder_fingerprint,
            "version": self.version,
        }
        (folder / "store.json").write_text(json.dumps(meta, indent=2) + "\n")

    @staticmethod
    def saved_version(folder) -> str:
        """The version a saved store records in store.json, read without loading the store."""
        return json.loads((Path(folder) / "store.json").read_text())["version"]

    @classmethod
    def load(cls, folder) -> KnowledgeStore:
        """Read a saved store, its index included (not rebuilt); checks it against store.json."""
        folder = Path(folder)
        meta = json.loads((folder / "store.json").read_text())
        table = pq.read_table(folder / "rows.parquet")
        soft = table.column("soft_label").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        states_file = folder / "teacher_states.npy"
        store = cls(
            inputs=list(zip(table.column("text_a").to_pylist(), table.column("text_b").to_pylist())),
            labels=table.column("label").to_numpy(),
            soft_labels=soft.reshape(meta["rows"], meta["num_labels"]),
            keys=np.load(folder / "keys.npy"),
            teacher_states=np.load(states_file) if states_file.exists() else None,
            encoder_fingerprint=meta["encoder_fingerprint"],
            example_ids=table.column("example_id").to_numpy(),
            index_kind=meta["index_kind"],
        )
        if store.version != meta["version"]:
            raise ValueError(f"{folder}: store content does not match its recorded version {meta['version']}")
        index = faiss.read_index(str(folder / "index.faiss"))
        if index.ntotal != len(store) or index.d != store.dim:
            raise ValueError(
                f"{folder}: index.faiss holds {index.ntotal} x {index.d}, the store {len(store)} x {store.dim}"
            )
        store._index = index
        store._index_options = meta["index_options"]
        return store


def _drop_excluded(scores: np.ndarray, ids: np.ndarray, exclude: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Remove each query's excluded id from k+1 results; where it is absent, drop the last result."""
    hits = (ids == exclude[:, None]) & (exclude[:, None] >= 0)
    drop = np.where(hits.any(axis=1), hits.argmax(axis=1), ids.shape[1] - 1)
    keep = np.ones_like(ids, dtype=bool)
    keep[np.arange(len(ids)), drop] = False
    shape = (len(ids), ids.shape[1] - 1)
    return scores[keep].reshape(shape), ids[keep].reshape(shape)
