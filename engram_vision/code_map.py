"""Code map: a surjective map of VQ codes to fewer canonical ids, applied before Engram hashing.

`fit_code_map` clusters the tokenizer's codebook vectors with k-means so that codes with similar vectors
share hash rows (the image analogue of the text Engram's tokenizer compression). It returns the lookup
tensor `hashing.hash_rows` takes as `code_map`; storing it beside the checkpoint and choosing num_ids
(`EngramConfig.code_map`) are left to the caller.
"""

# Follows the tokenizer-compression idea of DeepSeek's Engram (arXiv 2601.07372): many raw ids -> one
# canonical id before hashing; here "same meaning" is "nearby codebook vectors" instead of text normalisation.

from __future__ import annotations

import warnings

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning

_N_INIT = 4  # fixed so the result depends only on the codebook, num_ids and seed


def fit_code_map(codebook: torch.Tensor, num_ids: int, seed: int = 0, normalize: bool = True) -> torch.Tensor:
    """Map each code to one of `num_ids` canonical ids by k-means over the codebook vectors.

    codebook: float [V,D] (one vector per code); normalize: l2-normalise the vectors first (LlamaGen's
    codebook is compared by cosine). Returns int64 [V+1] on the CPU: entry v is code v's canonical id in
    [0, num_ids), every id is hit, and the last entry (raw PAD = V) maps to num_ids (the canonical PAD).
    Canonical ids are numbered by the first code of each cluster, so the map does not depend on k-means's
    cluster order. Raises ValueError when num_ids > V or k-means leaves a cluster empty (e.g. duplicate
    vectors).
    """
    if codebook.dim() != 2:
        raise ValueError(f"fit_code_map: codebook must be [V,D], got shape {tuple(codebook.shape)}")
    num_codes = codebook.shape[0]
    if not 1 <= num_ids <= num_codes:
        raise ValueError(f"fit_code_map: num_ids={num_ids} must lie in [1, V={num_codes}] (a surjective map "
                         f"cannot have more canonical ids than codes)")
    vectors = codebook.detach().to(device="cpu", dtype=torch.float64).numpy()
    if normalize:
        vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    with warnings.catch_warnings():
        # Too few distinct vectors shows up below as an empty cluster, with a clearer message.
        warnings.simplefilter("ignore", ConvergenceWarning)
        labels = KMeans(n_clusters=num_ids, n_init=_N_INIT, random_state=seed).fit(vectors).labels_
    _, first_code = np.unique(labels, return_index=True)
    if first_code.size != num_ids:
        raise ValueError(f"fit_code_map: k-means left {num_ids - first_code.size} of {num_ids} clusters empty "
                         f"(the codebook has too few distinct vectors); lower num_ids")
    # Renumber clusters in order of their first code: canonical id i is the cluster of the i-th new code.
    rank = np.empty(num_ids, dtype=np.int64)
    rank[np.argsort(first_code)] = np.arange(num_ids)
    mapped = rank[labels]
    return torch.from_numpy(np.concatenate([mapped, [num_ids]]).astype(np.int64))


__all__ = ["fit_code_map"]
