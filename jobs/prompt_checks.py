"""Prompt table checks before any model work: each file's columns (names, types) and each row's values."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.spec_rules import GENERATION_RULES, MAX_SEED, SpecError
from stages import columns as C
from stages.storage import full_uri

FLOAT_EXACT = 2 ** 53  # above this a float64 cannot hold every integer


def unified_schema(schema: pa.Schema, more: pa.Schema, name: str) -> pa.Schema:
    """The schemas of the files so far and of file `name`, as one, which the job reads every file in: dictionary
    columns (pandas' categoricals) as their values, a per-row integer setting as int64 also where a file holds it as
    floats (whole numbers up to 2^53, checked: pandas stores an integer column with gaps so), other int64 and
    double columns as double; a column of two incompatible types is one line naming it."""
    more = pa.schema([f.with_type(value_type(f.type)) for f in more])
    try:
        unified = pa.unify_schemas([schema, more], promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        clash = next(f for f in more if f.name in schema.names and schema.field(f.name).type != f.type)
        raise SpecError(f"prompts: column '{clash.name}' in {name} is {clash.type}, in the files before it "
                        f"{schema.field(clash.name).type}") from None
    return pa.schema([f.with_type(pa.int64()) if f.name in C.INT_PARAMS and pa.types.is_floating(f.type)
                      and _integer_somewhere(f.name, schema, more) else f for f in unified])


def check_casts(fs, paths: list[str], schema: pa.Schema, unified: pa.Schema) -> None:
    """The files of one `schema` hold values their columns keep in the `unified` types the job reads them in (an
    int64 column beside a uint64 one is int64, beside a double one double: 2^64 - 1 or 2^60 + 1 would not fit;
    timestamp[us] beside [ns] is ns: the year 9999 would not). A file's footer statistics answer where they can;
    the per-row settings' values are checked already."""
    columns = [f.name for f in schema if f.name not in C.INT_PARAMS and _differs(f.type, unified.field(f.name).type)]
    for path in paths if columns else ():
        name = full_uri(fs, path)
        with fs.open(path, "rb") as file:
            parquet = pq.ParquetFile(file)
            unsure = [c for c in columns if not _fits_by_statistics(parquet.metadata, c, schema.field(c).type,
                                                                    unified.field(c).type)]
            for batch in parquet.iter_batches(batch_size=65536, columns=unsure, use_threads=False) if unsure else ():
                for col in unsure:
                    try:
                        batch.column(col).cast(unified.field(col).type)
                    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
                        raise SpecError(f"prompts: column '{col}' in {name} is {schema.field(col).type}, read as "
                                        f"{unified.field(col).type} as in the other files, which cannot hold its "
                                        f"values ({err}): store it as one type in every file") from None


def _differs(kind: pa.DataType, unified: pa.DataType) -> bool:
    return value_type(kind) != unified and not pa.types.is_null(kind)


def _fits_by_statistics(metadata, column: str, kind: pa.DataType, unified: pa.DataType) -> bool:
    """Whether every row group's min and max of a flat column cast to `unified` (so do the values between)."""
    leaf = next((i for i in range(metadata.num_columns) if metadata.schema.column(i).path == column), None)
    if leaf is None or not metadata.num_row_groups:
        return False
    for group in range(metadata.num_row_groups):
        stats = metadata.row_group(group).column(leaf).statistics
        if stats is None or not stats.has_min_max:
            return False
        try:
            pa.array([stats.min, stats.max], kind).cast(unified)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError, TypeError,
                UnicodeDecodeError):
            return False
    return True


def _integer_somewhere(column: str, *schemas: pa.Schema) -> bool:
    return any(column in s.names and pa.types.is_integer(s.field(column).type) for s in schemas)


# Per-row settings under other names (diffusers' combined pipeline's arguments, or with spaces around, or a space
# or '-' for '_'): without a check they would pass through as the table's own columns while every row takes the
# job's value. Another case (LAION's WIDTH and HEIGHT: the source image's size) is the table's own column.
SETTING_ALIASES = {"num_inference_steps": C.DECODER_STEPS, "prior_num_inference_steps": C.PRIOR_STEPS,
                   "guidance_scale": f"{C.PRIOR_GUIDANCE} or {C.DECODER_GUIDANCE}"}
JOB_WIDE = "images_per_prompt"  # a generation key no column sets: every row would take the job's value


def _spelled(column: str) -> str:
    """A column name as a setting's would read written another way (`negative prompt`, `prior-steps`, ` height`)."""
    return column.strip().replace(" ", "_").replace("-", "_")


def check_schema(schema: pa.Schema, name: str) -> tuple[str, ...]:
    twice = sorted({c for c in schema.names if schema.names.count(c) > 1})
    if twice:
        raise SpecError(f"prompts: column '{twice[0]}' appears twice in {name}; rename one")
    settings = (C.PROMPT, *C.OVERRIDABLE)
    for col in schema.names:
        meant = SETTING_ALIASES.get(col) or next((s for s in settings if col != s and _spelled(col) == s), None)
        if meant:
            raise SpecError(f"prompts: column '{col}' in {name} is not a per-row setting (did you mean '{meant}'? "
                            f"names are exact); rename it to set the rows' value, or to another name to keep it "
                            f"as your own column")
    if col := next((c for c in schema.names if _spelled(c) == JOB_WIDE), None):
        raise SpecError(f"prompts: column '{col}' in {name} is not a per-row setting (it is one value for "
                        f"the whole job: generation.{JOB_WIDE}); rename the column to keep it as your own")
    if C.PROMPT not in schema.names:
        raise SpecError(f"prompts: {name} has no '{C.PROMPT}' column (columns: {', '.join(map(repr, schema.names))})")
    for col in C.RESERVED:
        if col in schema.names:
            hint = " (per-row checkpoints: use sweep: {prior_checkpoint: [...]})" if col == C.PRIOR_CHECKPOINT else ""
            raise SpecError(f"prompts: column '{col}' in {name} is set by the job itself, so its values would be "
                            f"replaced: rename the column{hint}")
    for col in (C.PROMPT, C.NEGATIVE_PROMPT):
        kind = schema.field(col).type if col in schema.names else pa.string()
        values = value_type(kind)  # a pandas categorical: its values
        if not (_is_string(values) or pa.types.is_null(values)):
            raise SpecError(f"prompts: column '{col}' in {name} is {kind}, not string")
    for col in C.INT_PARAMS + C.FLOAT_PARAMS:
        if col in schema.names:
            kind = schema.field(col).type
            if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_null(kind)):
                raise SpecError(f"prompts: column '{col}' in {name} is {kind}, not a number")
    return tuple(c for c in (C.PROMPT, *C.OVERRIDABLE) if c in schema.names)


def check_rows(batch: pa.RecordBatch, name: str, offset: int, images_per_prompt: int = 1) -> None:
    def fail(mask, message, values=None):
        where = np.flatnonzero(np.asarray(mask))
        if len(where):
            got = f", got {values[where[0]]}" if values is not None else ""
            raise SpecError(f"prompts: {name} row {offset + where[0]}: {message}{got}")

    fail(pc.is_null(batch.column(C.PROMPT)).to_numpy(zero_copy_only=False), "prompt is null")
    for col in batch.schema.names:
        if col in (C.PROMPT, C.NEGATIVE_PROMPT):
            check_utf8(batch.column(col), col, name, offset)
            continue
        column = batch.column(col)
        present = pc.is_valid(column).to_numpy(zero_copy_only=False)
        if pa.types.is_integer(column.type):  # checked as integers: 2^53 + 1 must not become 2^53
            if col == C.SEED and column.type.bit_width == 64:
                top = pa.scalar(MAX_SEED - (images_per_prompt - 1), column.type)
                fail(pc.fill_null(pc.greater(column, top), False).to_numpy(zero_copy_only=False),
                     f"seed must be at most 2^63 - {images_per_prompt} (seed + image index is a signed 64-bit "
                     f"integer)", column)
            elif column.type.bit_width == 64:  # a uint64 column: its values must fit the int64 the rows carry
                fail(pc.fill_null(pc.greater(column, pa.scalar(MAX_SEED, column.type)), False).to_numpy(
                    zero_copy_only=False), f"{col} must fit a signed 64-bit integer", column)
            values = pc.fill_null(column, 1).to_numpy(zero_copy_only=False).astype(np.int64)  # int8: 128 fits
        else:
            values = column.to_numpy(zero_copy_only=False).astype(np.float64)  # null → nan
            fail(present & ~np.isfinite(values), f"{col} must be a finite number", values)
            if col in C.INT_PARAMS:
                fail(present & (values != np.round(values)), f"{col} must be a whole number", values)
                fail(present & (np.abs(values) > FLOAT_EXACT), f"{col} is a floating-point column and its value "
                     f"is above 2^53, where floats skip integers: store {col} as int64", values)
            values = np.nan_to_num(values)
        is_bad, message = GENERATION_RULES[col]
        fail(present & is_bad(values), f"{col} {message}", values)


def blank_prompts(batch: pa.RecordBatch) -> np.ndarray:
    """Indices of the batch's rows whose prompt is empty or only whitespace (an unconditional image)."""
    prompts = batch.column(C.PROMPT)
    trimmed = pc.utf8_trim_whitespace(prompts.dictionary_decode() if pa.types.is_dictionary(prompts.type) else prompts)
    return np.flatnonzero(pc.fill_null(pc.equal(trimmed, ""), False).to_numpy(zero_copy_only=False))


def check_utf8(column: pa.Array, col: str, name: str, offset: int) -> None:
    """A column's strings (at any depth) must be UTF-8 (a writer can store others), or the run fails mid-way."""
    try:
        column.validate(full=True)
        return
    except pa.ArrowInvalid:
        pass
    values, where = (column.dictionary, "a value of its dictionary") if pa.types.is_dictionary(column.type) else (
        column, None)
    if _is_string(values.type):
        raw = values.view(pa.large_binary() if pa.types.is_large_string(values.type) else pa.binary()).to_pylist()
        bad = next(i for i, v in enumerate(raw) if v is not None and not _utf8(v))
        got = f", got {raw[bad][:40]!r}"
    else:  # a list or struct of strings: the row is named
        bad, got = next(i for i in range(len(values)) if not _valid(values.take([i]))), ""
    where = where or f"row {offset + bad}"
    raise SpecError(f"prompts: {name} {where}: {col} is not UTF-8 text{got}") from None


def _valid(array: pa.Array) -> bool:
    try:
        array.validate(full=True)
        return True
    except pa.ArrowInvalid:
        return False


def value_type(kind: pa.DataType) -> pa.DataType:
    """A dictionary column's values' type (pandas' categoricals), else the type itself."""
    return kind.value_type if pa.types.is_dictionary(kind) else kind


def _is_string(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def is_text(kind: pa.DataType) -> bool:
    """A type holding strings at any depth (a string, or a dictionary, list, struct or map of them)."""
    if _is_string(kind):
        return True
    if pa.types.is_dictionary(kind):
        return is_text(kind.value_type)
    if pa.types.is_map(kind):
        return is_text(kind.key_type) or is_text(kind.item_type)
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        return is_text(kind.value_type)
    if pa.types.is_struct(kind):
        return any(is_text(kind.field(i).type) for i in range(kind.num_fields))
    return False


def _utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False
