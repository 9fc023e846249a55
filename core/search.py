"""Exact cosine k-nearest-neighbour search: faiss on the CPU, torch matmul + topk on CUDA.

Every result list is ordered by (-similarity, gallery index), the tie rule of DESIGN.md, whichever
backend produced it: a backend only proposes a few more candidates than asked for, and the lists
are then re-sorted and *certified* (the k-th similarity strictly beats everything not returned);
the rare row that cannot be certified (a tie straddling the cut) is recomputed over the whole gallery.
"""
from __future__ import annotations

import warnings
from typing import Protocol

import numpy as np
import torch

# Extra candidates asked of a backend so that ties at the k-th place can almost always be certified.
TIE_MARGIN = 8
# Bound on a chunk of the query x gallery similarity matrix, so memory stays flat at any size.
CHUNK_BYTES = 512 * 2**20


class SearchBackend(Protocol):
    """Proposes, for each query row, the `k` gallery rows of highest inner product (any tie order)."""

    def candidates(self, queries: np.ndarray, gallery: np.ndarray, k: int,
                   exclude: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]: ...


class FaissSearch:
    """faiss IndexFlatIP: exact inner product with BLAS, the fastest exact search on a CPU."""

    def candidates(self, queries, gallery, k, exclude):
        import faiss  # imported here so GPU-only machines without faiss can still use TorchSearch

        index = faiss.IndexFlatIP(gallery.shape[1])
        index.add(np.ascontiguousarray(gallery, dtype=np.float32))
        extra = 0 if exclude is None else 1
        want = min(k + extra, len(gallery))
        scores, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), want)
        if exclude is None:
            return scores[:, :k], ids[:, :k]
        return _drop_excluded(scores, ids, exclude, k)


class TorchSearch:
    """Chunked matmul + topk in float32 on any torch device (the CUDA path)."""

    def __init__(self, device: str = "cuda"):
        self.device = torch.device(device)

    def candidates(self, queries, gallery, k, exclude):
        g = _as_tensor(gallery, self.device)
        rows = max(1, CHUNK_BYTES // (4 * max(1, len(gallery))))
        out_scores, out_ids = [], []
        for start in range(0, len(queries), rows):
            q = torch.as_tensor(np.ascontiguousarray(queries[start:start + rows], dtype=np.float32),
                                device=self.device)
            sims = q @ g.T
            if exclude is not None:
                own = torch.as_tensor(exclude[start:start + rows], device=self.device)
                sims[torch.arange(len(q), device=self.device), own] = -torch.inf
            s, i = torch.topk(sims, k, dim=1)
            out_scores.append(s.cpu().numpy())
            out_ids.append(i.cpu().numpy())
        return np.concatenate(out_scores), np.concatenate(out_ids).astype(np.int64)


def _as_tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A float32 tensor over the array without copying it on the CPU. Memory-mapped cache files are
    read-only, which torch warns about; search only reads the gallery, so the warning is moot."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.as_tensor(np.ascontiguousarray(array, dtype=np.float32), device=device)


def _drop_excluded(scores, ids, exclude, k):
    """Remove each query's excluded gallery row (its own image); keep k of the rest."""
    keep = ids != exclude[:, None]
    # Where the excluded row was not returned, the extra last candidate goes instead.
    keep[keep.sum(axis=1) > k, -1] = False
    n_keep = keep.sum(axis=1)
    if not (n_keep == n_keep[0]).all():  # only when the gallery is smaller than k + 1
        raise ValueError("gallery too small for the requested k")
    return scores[keep].reshape(len(ids), -1), ids[keep].reshape(len(ids), -1)


def default_backend(device: str | None = None) -> SearchBackend:
    """faiss on the CPU, torch on CUDA: the two exact searches DESIGN.md names (torch on the CPU too where
    faiss is not installed, as on the lent GPU machines)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu":
        return TorchSearch(device)
    try:
        import faiss  # noqa: F401 - only whether it is there
    except ImportError:
        return TorchSearch("cpu")
    return FaissSearch()


def top_k(queries: np.ndarray, gallery: np.ndarray, k: int, *, exclude_self: bool = False,
          backend: SearchBackend | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product (cosine for L2-normalised rows), ties broken by gallery index.

    With `exclude_self`, queries are the gallery itself and row i never retrieves row i
    (dropped by index, not by "first result": duplicates exist). Returns (scores float32 n x k,
    ids int64 n x k); k is capped at the number of retrievable rows.
    """
    queries = np.asarray(queries, dtype=np.float32)
    gallery = np.asarray(gallery, dtype=np.float32)
    if queries.ndim != 2 or gallery.ndim != 2 or queries.shape[1] != gallery.shape[1]:
        raise ValueError(f"queries {queries.shape} and gallery {gallery.shape} must be 2-D with the same width")
    if exclude_self and len(queries) != len(gallery):
        raise ValueError("exclude_self needs queries and gallery to be the same rows")
    exclude = np.arange(len(queries)) if exclude_self else None
    available = len(gallery) - (1 if exclude_self else 0)
    k = min(int(k), available)
    if k < 1:
        raise ValueError("nothing to retrieve: the gallery is empty")
    backend = backend or default_backend()
    asked = min(k + TIE_MARGIN, available)
    scores, ids = backend.candidates(queries, gallery, asked, exclude)
    order = np.lexsort((ids, -scores), axis=1)
    scores = np.take_along_axis(scores, order, axis=1)
    ids = np.take_along_axis(ids, order, axis=1)
    if asked < available:
        # Not certified: something outside the list may tie with the k-th item and win on index.
        for row in np.flatnonzero(scores[:, k - 1] <= scores[:, -1]):
            sims = gallery @ queries[row]
            if exclude_self:
                sims[row] = -np.inf
            best = np.lexsort((np.arange(len(sims)), -sims))[:asked]
            scores[row], ids[row] = sims[best], best
    return scores[:, :k], ids[:, :k]
