"""Helpers for stages: group a Ray batch by shape, per-row generators, and columns of mixed shapes."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from stages.dtypes import MICRO_BATCH


def group_rows(batch: dict[str, np.ndarray], keys: tuple[str, ...], extra=None) -> dict[tuple, np.ndarray]:
    """Row indices of the batch grouped by the values of `keys` (and `extra(i)` if given), in first-seen order."""
    n = len(batch[keys[0]])
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i in range(n):
        key = tuple(getattr(batch[k][i], "item", lambda v=batch[k][i]: v)() for k in keys)
        groups[key + ((extra(i),) if extra else ())].append(i)
    return {key: np.asarray(idx) for key, idx in groups.items()}


# Rows per model call. Float reductions are ordered by the shapes a kernel sees, so a row's result
# changes (by a few 1e-7) with the batch size it is computed in; at one fixed shape it is bitwise
# independent of its position and neighbours. Every stage pads its model calls to this size, so an
# image never depends on the Ray batch size, the batch composition or the actor count. The size is the
# spec's `stages.<name>.micro_batch` (default MICRO_BATCH): it fixes the bits of the output and bounds peak memory.


def micro_batches(idx: np.ndarray, size: int = MICRO_BATCH):
    """Yield (chunk, n_real): `size` row indices each, the last chunk padded by repeating its last row."""
    for start in range(0, len(idx), size):
        chunk = idx[start:start + size]
        yield np.concatenate([chunk, np.repeat(chunk[-1:], size - len(chunk))]), len(chunk)


def current_node() -> str:
    """The hex id of the Ray node this process runs on, or "" when called without Ray (or with none installed)."""
    try:
        import ray
    except ModuleNotFoundError:
        return ""
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


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


def flag_rows(errors: np.ndarray, parts: list[tuple[np.ndarray, np.ndarray]], message: str) -> np.ndarray:
    """Set `message` on the rows whose flag in `parts` (row indices, per-row all-finite flags) is False;
    earlier errors are kept."""
    errors = np.asarray(errors, dtype=object).copy()
    for idx, finite in parts:
        for i in idx[~np.asarray(finite, dtype=bool)]:
            errors[i] = errors[i] or message
    return errors


def nonfinite(stage: str, dtype: torch.dtype) -> str:
    """The error of a row whose output holds NaN or inf; half precision may be the cause, float32 is not (a
    guidance scale out of range, or NaN in the checkpoint's weights where every row fails)."""
    return f"{stage} produced NaN or inf" + (" (try dtype float32)" if dtype != torch.float32 else
                                             " (check the row's guidance scale and the checkpoint's weights)")


def flag_nonfinite(errors: np.ndarray, parts: list[tuple[np.ndarray, np.ndarray]], message: str) -> np.ndarray:
    """Set `message` on rows whose output holds NaN or inf; earlier errors are kept."""
    return flag_rows(errors, [(idx, np.isfinite(v.reshape(len(v), -1)).all(axis=1)) for idx, v in parts], message)


def transport_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype tensors travel in between stages: float32 for float32 runs, else float16 (exact for bf16
    values inside float16's range; outside it they become inf, and the row is flagged)."""
    return torch.float32 if dtype == torch.float32 else torch.float16


def batch_tensor(column: np.ndarray, idx: np.ndarray, device, dtype) -> torch.Tensor:
    """Rows `idx` of a (possibly object-typed) tensor column as one tensor on the device (pinned copy)."""
    from stages.denoise import to_device

    rows = column[idx]
    array = np.stack(list(rows)) if rows.dtype == object else rows
    return to_device(torch.from_numpy(np.ascontiguousarray(array)), torch.device(device), dtype)
