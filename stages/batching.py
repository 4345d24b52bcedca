"""Helpers for stages: group a Ray batch by shape, per-row generators, and columns of mixed shapes."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch


def group_rows(batch: dict[str, np.ndarray], keys: tuple[str, ...], extra=None) -> dict[tuple, np.ndarray]:
    """Row indices of the batch grouped by the values of `keys` (and `extra(i)` if given), in first-seen order."""
    n = len(batch[keys[0]])
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i in range(n):
        key = tuple(batch[k][i].item() for k in keys)
        groups[key + ((extra(i),) if extra else ())].append(i)
    return {key: np.asarray(idx) for key, idx in groups.items()}


def seeded_generators(seeds) -> list[torch.Generator]:
    """One CPU generator per row, seeded from the row's seed (as diffusers' reproducibility guide does)."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def restored_generators(states) -> list[torch.Generator]:
    """CPU generators continuing from the states saved after Stage C."""
    gens = []
    for state in states:
        gen = torch.Generator()
        gen.set_state(torch.from_numpy(np.ascontiguousarray(state, dtype=np.uint8)))
        gens.append(gen)
    return gens


def generator_states(gens: list[torch.Generator]) -> np.ndarray:
    """(B, S) uint8 states of CPU generators."""
    return np.stack([g.get_state().numpy() for g in gens])


def scatter(n: int, parts: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Put per-group arrays back in row order; a column of mixed shapes becomes an object array."""
    rows: list = [None] * n
    for idx, values in parts:
        for i, value in zip(idx, values):
            rows[i] = value
    if len({r.shape for r in rows}) == 1:
        return np.stack(rows)
    column = np.empty(n, dtype=object)
    column[:] = rows
    return column


def batch_tensor(column: np.ndarray, idx: np.ndarray, device, dtype) -> torch.Tensor:
    """Rows `idx` of a (possibly object-typed) tensor column as one tensor on the device."""
    rows = column[idx]
    array = np.stack(list(rows)) if rows.dtype == object else rows
    return torch.from_numpy(np.ascontiguousarray(array)).to(device=device, dtype=dtype)
