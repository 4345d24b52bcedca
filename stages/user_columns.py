"""The prompt table's own columns on their way to the manifest: one bytes column while rows travel between stages,
written back in the table's types.

Ray Data guesses a numpy column's type afresh for every block: an integer column's nulls become NaN, a block
holding only nulls of a column comes back as float32 NaN, and blocks merged later turn those into the text 'nan'.
So the reader packs each row's own values (exact Python values, from Arrow) into `C.USER_VALUES`, and the writers
unpack them with the prompt table's schema. The bytes never leave the run: they are not written anywhere.
"""

from __future__ import annotations

import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from stages import columns as C

JOB_COLUMNS = frozenset((C.PROMPT, *C.OVERRIDABLE, *C.RESERVED, C.USER_VALUES))
SAMPLE_ROWS = 1024  # a file's first rows, measured for the size of its rows in a block


def user_names(names) -> list[str]:
    """The names among `names` that are the user's own columns (not set or read by the job)."""
    return [name for name in names if name not in JOB_COLUMNS]


def pack(table: pa.Table) -> pa.Table:
    """`table` with its user columns replaced by one USER_VALUES column: each row's {name: value}, pickled."""
    names = user_names(table.column_names)
    if not names:
        return table
    rows = table.select(names).to_pylist()
    packed = pa.array([pickle.dumps(row, protocol=pickle.HIGHEST_PROTOCOL) for row in rows], pa.binary())
    return table.drop_columns(names).append_column(C.USER_VALUES, packed)


def packed_row_bytes(parquet: pq.ParquetFile) -> int:
    """The bytes a row of the file takes in a block once packed (its own columns pickled: a dictionary-encoded or
    categorical column as long as its values), measured on its first SAMPLE_ROWS rows."""
    batch = next(parquet.iter_batches(batch_size=SAMPLE_ROWS, use_threads=False), None)
    if batch is None or not batch.num_rows:
        return 0
    return -(-pack(pa.Table.from_batches([batch])).nbytes // batch.num_rows)


def unpack(values: np.ndarray, types: pa.Schema | None) -> dict[str, pa.Array]:
    """{name: array} of the packed rows, every user column of `types` included (null where a row's file lacks it),
    each in its type where the values allow it."""
    rows = [pickle.loads(value) for value in values]
    names = dict.fromkeys(user_names(types.names) if types is not None else [])
    names.update(dict.fromkeys(name for row in rows for name in row))
    return {name: typed([row.get(name) for row in rows], type_of(name, types)) for name in names}


def typed(values: list, wanted: pa.DataType | None) -> pa.Array:
    """`values` as an Arrow array of type `wanted`, exactly (NaN stays NaN, nanoseconds and 2^64 - 1 are kept);
    as inferred where they do not fit it, or as text where Arrow cannot infer one type: kept rather than lost."""
    cuts = wanted is not None and pa.types.is_integer(wanted) and any(  # pa.array would drop a float's fraction
        isinstance(v, float) and not v.is_integer() for v in values)
    for kind in ([wanted] if wanted is not None and not cuts else []) + [None]:
        try:
            return pa.array(values, kind)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError, TypeError):
            continue
    return pa.array([None if v is None else str(v) for v in values], pa.string())


def type_of(name: str, types: pa.Schema | None) -> pa.DataType | None:
    """Column `name`'s type in `types` (None where unknown)."""
    return types.field(name).type if types is not None and name in types.names else None
