"""Row identity: each row's checkpoint name and its row id, a hash of everything that determines its image."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from stages import columns as C


ID_COLUMNS = tuple(sorted((C.PROMPT, *C.OVERRIDABLE, C.CHECKPOINT)))  # the keys of a row id's JSON, in its order


def identify(rows: dict[str, np.ndarray], model: dict) -> None:
    """Set each row's checkpoint identity (its prior, the decoder, the dtype; a re-decode at another dtype than
    Stage C's, `prior_dtype`, names both) and its row id (the first 32 hex digits of the sha256 of the row's JSON
    over ID_COLUMNS, keys sorted, floats for the float parameters; tests/test_prompts.py's row_id is the per-row
    definition), formed column-wise: integers printed by Arrow, other values' JSON once per distinct value, the rows'
    texts joined by Arrow, then one sha256 a row."""
    dtype, prior_dtype = model["dtype"], model.get("prior_dtype", model["dtype"])
    suffix = f" decoder={model['decoder']} dtype={prior_dtype}"
    suffix += f" decoder_dtype={dtype}" if dtype != prior_dtype else ""
    rows[C.CHECKPOINT] = _per_distinct(rows[C.PRIOR_CHECKPOINT], lambda p: f"prior={p}{suffix}").to_numpy(
        zero_copy_only=False).astype(object)
    pieces = []
    for i, col in enumerate(ID_COLUMNS):
        pieces += [("{" if i == 0 else ", ") + json.dumps(col) + ": ", _json_texts(rows[col], col)]
    texts = pc.binary_join_element_wise(*pieces, "}", "").cast(pa.binary()).to_pylist()
    rows[C.ROW_ID] = np.asarray([hashlib.sha256(t).hexdigest()[:32] for t in texts], dtype=object)


_JSON = json.JSONEncoder(ensure_ascii=False).encode  # json.dumps(value, ensure_ascii=False), built once


def _json_texts(values: np.ndarray, col: str) -> pa.Array:
    """Each value's JSON as in a row id (floats for the float parameters)."""
    values = np.asarray(values)
    if values.dtype.kind in "iu" and col not in C.FLOAT_PARAMS:
        return pa.array(values).cast(pa.string())  # an integer's JSON is its decimal digits
    if col in C.FLOAT_PARAMS:
        return _per_distinct(values.astype(np.float64), lambda v: _JSON(float(v)))
    return _per_distinct(values, _JSON)


def _per_distinct(values: np.ndarray, text) -> pa.Array:
    """`text(v)` for each row's value v, called once per distinct value (Arrow's hash dictionary, which keeps
    -0.0 and 0.0 apart)."""
    encoded = pa.array(np.asarray(values)).dictionary_encode(null_encoding="encode")
    return pa.array([text(v) for v in encoded.dictionary.to_pylist()], pa.string()).take(encoded.indices)
