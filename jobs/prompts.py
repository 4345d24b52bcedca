"""Reader: find the prompt table's Parquet files and validate every row before any model is loaded."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.prompt_checks import blank_prompts, check_casts, check_rows, check_schema, check_utf8, is_text, unified_schema
from jobs.row_ids import identify
from jobs.spec import JobSpec
from jobs.spec_rules import SpecError, sweep_warnings
from stages import columns as C
from stages import user_columns
from stages.refs import prior_id
from stages.storage import full_uri, reason, url_to_fs


EXPANDED_ROWS = 4096  # image rows one expansion batch makes at most (bounded task memory for any sweep size)
READ_BUFFER = 1 << 20  # bytes read at a time from a column chunk
PARAMETER_BYTES = 200  # what expansion adds to a prompt row (its id, filled parameters: ~150 B measured on tiny.yaml)


@dataclass(frozen=True)
class PromptTable:
    """The validated table: its files (paths on `fs`), its row count, and its columns' types over all files."""

    fs: object
    files: tuple[str, ...]
    rows: int
    schema: pa.Schema  # the files' schemas unified: the reader's types, and the writers' for the user's columns …
    written: pa.Schema | None = None  # … but where the output holds a column as a dictionary of that type (an
    # earlier version kept pandas categoricals so): the writers' types then
    blank: int = 0  # rows whose prompt is empty or whitespace: made, as unconditional images
    first_blank: str = ""  # the first of them, as "<file> row <n>"
    swept: tuple[tuple[str, str], ...] = ()  # (column, sweep axis) where a sweep axis replaces the table's column
    notes: tuple[str, ...] = ()  # warnings on the spec's sweep (values making the same images)
    prompt_bytes: int = 0  # a prompt row's size in a block (its own columns packed), measured on its first rows

    @property
    def row_bytes(self) -> int:
        """About how many bytes a planned row takes in a block: its prompt row's, and its parameters and ids."""
        return self.prompt_bytes + PARAMETER_BYTES

    def blank_warning(self) -> str | None:
        """The warning for rows with an empty or whitespace prompt, else None."""
        if not self.blank:
            return None
        return (f"warning: {self.blank} prompt rows are empty or only whitespace (first: {self.first_blank}): "
                f"they make unconditional images")

    def warnings(self) -> list[str]:
        """Warnings on the table as the job reads it (empty prompts, columns a sweep replaces, repeated sweep
        values)."""
        replaced = [f"its {column} column by sweep.{axis}" for column, axis in self.swept]
        return [*filter(None, [self.blank_warning()]), *self.notes, *(
            [f"warning: the prompt table's own values are not used for {'; '.join(replaced)} (a sweep value "
             f"replaces the row's): drop the column, or the axis"] if replaced else [])]

    @property
    def user_types(self) -> pa.Schema:
        """The types the writers give the user's columns."""
        return self.written or self.schema


PARQUET_SUFFIXES = (".parquet", ".parq", ".pq")  # in any case; a folder's other files (_SUCCESS, .crc) are not read


def list_files(uri: str, storage_options: dict) -> tuple[object, list[str]]:
    """The Parquet files of a file or directory URI, or a one-line error naming it. In a folder, as Spark, Arrow and
    Ray read one, names and subfolders starting with "." or "_" are skipped (Spark's _temporary/, hidden files)."""
    try:
        fs, path = url_to_fs(uri, storage_options)
        if not fs.exists(path):
            glob = " (glob patterns are not expanded: give the folder)" if any(c in uri for c in "*?[") else ""
            raise SpecError(f"prompts: {uri} does not exist{glob}")
        if not fs.isdir(path):
            files = [path]
        else:
            root = path.rstrip("/") + "/"
            files = sorted(p for p in fs.find(path) if p.lower().endswith(PARQUET_SUFFIXES)
                           and not any(part.startswith((".", "_")) for part in p[len(root):].split("/")))
    except SpecError:
        raise
    except Exception as err:  # noqa: BLE001 - credentials, a missing bucket, no network: one line naming it
        raise SpecError(f"prompts: cannot read {uri} ({reason(err)})") from None
    if not files:
        raise SpecError(f"prompts: no Parquet files ({' / '.join(PARQUET_SUFFIXES)}) under {uri}")
    query = next((f for f in files if "?" in f), None)
    if query:  # Ray's reader takes what follows a "?" for a URL query, and reads no row of the file
        raise SpecError(f"prompts: {full_uri(fs, query)}: a '?' in a path cannot be read; rename it")
    return fs, files


def scan(spec: JobSpec) -> PromptTable:
    """Check schema and values of every row, streaming the files (nothing is collected)."""
    fs, files = list_files(spec.prompts, spec.storage_options)
    rows, unified, by_schema, blank, first_blank, measured = 0, pa.schema([]), {}, 0, "", {}
    for path in files:
        name = full_uri(fs, path)
        try:
            parquet = pq.ParquetFile(fs.open(path, "rb"), pre_buffer=False,  # pre-buffering: +140 MiB at 10M rows
                                     buffer_size=READ_BUFFER)  # pages as read, not whole column chunks
        except (pa.ArrowInvalid, OSError) as err:
            raise SpecError(f"prompts: {name} is not a readable Parquet file ({err})") from None
        schema = parquet.schema_arrow
        key = schema.remove_metadata()
        by_schema.setdefault(key, []).append(path)  # the distinct schemas: a few, any table size
        present = check_schema(schema, name)
        unified = unified_schema(unified, schema, name)
        texts = [c for c in user_columns.user_names(schema.names) if is_text(schema.field(c).type)]
        offset = 0
        try:  # the user's text columns too: bytes that are not UTF-8 would end the run in Ray's reader
            for batch in parquet.iter_batches(batch_size=65536, columns=[*present, *texts], use_threads=False):
                check_rows(batch.select(list(present)), name, offset, spec.generation.images_per_prompt)
                if len(empty := blank_prompts(batch)):
                    first_blank = first_blank or f"{name} row {offset + empty[0]}"
                    blank += len(empty)
                for col in texts:
                    check_utf8(batch.column(col), col, name, offset)
                offset += batch.num_rows
            if offset and not measured.get(key):  # a few files: one per distinct schema
                measured[key] = user_columns.packed_row_bytes(parquet)
        except (pa.ArrowInvalid, OSError) as err:  # a corrupt page behind an intact footer
            raise SpecError(f"prompts: {name} is not a readable Parquet file (after row {offset}: {err})") from None
        rows += offset
    if rows == 0:
        raise SpecError(f"prompts: {spec.prompts} has no rows")
    for schema, paths in by_schema.items():
        check_casts(fs, paths, schema, unified)
    swept = tuple((column, axis) for axis in spec.sweep
                  for column in ((C.HEIGHT, C.WIDTH) if axis == C.RESOLUTION else (axis,)) if column in unified.names)
    return PromptTable(fs=fs, files=tuple(files), rows=rows, schema=unified, blank=blank,
                       first_blank=first_blank, swept=swept, notes=tuple(sweep_warnings(spec.sweep)),
                       prompt_bytes=max(measured.values(), default=0))


def planned_rows(spec: JobSpec, prompt_rows: int) -> int:
    """Image rows a table of `prompt_rows` makes: × every sweep combination × images_per_prompt."""
    return prompt_rows * math.prod(len(values) for values in spec.sweep.values()) * spec.generation.images_per_prompt


def count_rows(spec: JobSpec) -> int:
    """The prompt table's row count from the Parquet footers alone (no row is read)."""
    fs, files = list_files(spec.prompts, spec.storage_options)
    total = 0
    for path in files:
        with fs.open(path, "rb") as f:
            total += pq.ParquetFile(f).metadata.num_rows
    return total


def defaults_for(spec: JobSpec) -> dict:
    """Per-row defaults from the spec, keyed by column (prior_steps None → 0, the default schedule)."""
    gen = spec.generation
    values = {col: getattr(gen, col) for col in C.OVERRIDABLE}
    values[C.PRIOR_STEPS] = gen.prior_steps or 0
    values[C.PRIOR_CHECKPOINT] = prior_id(spec.model.prior)
    return values


def sweep_combinations(sweep: dict) -> list[dict]:
    """Every combination of the sweep axes as {column: value}; [{}] without a sweep."""
    combos = []
    for values in itertools.product(*sweep.values()):
        combo = {}
        for axis, value in zip(sweep, values):
            if axis == C.RESOLUTION:
                combo[C.HEIGHT], combo[C.WIDTH] = value
            elif axis == C.PRIOR_CHECKPOINT:
                combo[axis] = prior_id(value)
            else:
                combo[axis] = value or 0 if axis == C.PRIOR_STEPS else value
        combos.append(combo)
    return combos


def expand_table(table: pa.Table, defaults: dict, images_per_prompt: int, model: dict, combos: list[dict] = ({},)):
    """expand_rows for an Arrow batch, yielded in batches of at most EXPANDED_ROWS image rows however many a prompt
    row makes (a sweep × images_per_prompt); integer columns are filled and converted as integers (numpy would
    turn an int64 column with nulls into float64, and 2^53 + 1 into 2^53)."""
    batch, table = {}, user_columns.pack(table)  # the user's columns travel as one bytes column, exactly
    for name in table.column_names:
        column = table.column(name)
        if pa.types.is_integer(column.type) and isinstance(defaults.get(name), int):
            column = pc.fill_null(column.cast(pa.int64()), defaults[name])
        batch[name] = column.to_numpy(zero_copy_only=False)
    total = table.num_rows * len(combos) * images_per_prompt
    for start in range(0, total, EXPANDED_ROWS):
        yield expand_rows(batch, defaults, images_per_prompt, model, combos,
                          span=(start, min(start + EXPANDED_ROWS, total)))


def expand_rows(batch: dict[str, np.ndarray], defaults: dict, images_per_prompt: int, model: dict,
                combos: list[dict] = ({},), span: tuple[int, int] | None = None) -> dict:
    """Each prompt row × each sweep combination × each image (seed + k) (or the `span` of them, counted in that
    order): fill parameters, add row ids (a job drops done rows with an anti-join), and order rows by shape bucket
    so stages see runs of one shape."""
    n, m, k = len(batch[C.PROMPT]), len(combos), images_per_prompt
    flat = np.arange(*(span or (0, n * m * k)))
    rows, combo = flat // (m * k), flat // k % m
    out = {col: np.asarray(values)[rows] for col, values in batch.items()}  # user columns pass through
    for col, default in defaults.items():
        out[col] = filled(batch.get(col), default, n)[rows]
    for col in dict.fromkeys(c for combo_values in combos for c in combo_values):
        out[col] = np.asarray([c[col] for c in combos], dtype=out[col].dtype)[combo]
    out[C.IMAGE_INDEX] = flat % k
    out[C.SEED] = out[C.SEED] + out[C.IMAGE_INDEX]
    identify(out, model)
    out[C.ERROR] = np.full(len(rows), "", dtype=object)
    return shape_order(out)


def stage_rows(spec: JobSpec, texts: list[str]) -> dict[str, np.ndarray]:
    """The rows the stages see for these prompts (prompt i with seed i, the spec's other settings), expanded as
    the reader does: a batch to call the stage classes with directly, without Ray."""
    batch = {C.PROMPT: np.asarray(texts, dtype=object), C.SEED: np.arange(len(texts))}
    return expand_rows(batch, defaults_for(spec), 1, dict(decoder=spec.model.decoder, dtype=spec.model.dtype))


def expansion_batch(rows_per_prompt: int) -> int:
    """Prompt rows per expansion batch: about EXPANDED_ROWS image rows, whatever the input's row groups."""
    return max(1, EXPANDED_ROWS // max(rows_per_prompt, 1))


SHAPE_KEYS = (C.PRIOR_CHECKPOINT, C.HEIGHT, C.WIDTH, C.PRIOR_STEPS, C.DECODER_STEPS)  # a shape bucket, major first


def shape_order(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The batch's rows ordered by shape bucket (checkpoint, height, width, steps): stages see runs of one shape."""
    if not len(batch[C.ROW_ID]):
        return batch
    checkpoints = np.unique(np.asarray(batch[C.PRIOR_CHECKPOINT]).astype(str), return_inverse=True)[1].ravel()
    order = np.lexsort([checkpoints if key == C.PRIOR_CHECKPOINT else batch[key] for key in reversed(SHAPE_KEYS)])
    return {col: np.asarray(values)[order] for col, values in batch.items()}


def filled(values, default, n: int) -> np.ndarray:
    """A column of `n` values: `values` (None: none given) with nulls replaced by `default`, in its type."""
    if isinstance(default, str):
        column = np.full(n, default, dtype=object)
        if values is not None:
            column = np.where([v is None for v in values], column, values).astype(object)
        return column
    kind = np.int64 if isinstance(default, int) else np.float64
    if values is None:
        return np.full(n, default, dtype=kind)
    if np.issubdtype(np.asarray(values).dtype, np.integer):  # no nulls: exact, never through float64
        return np.asarray(values).astype(kind)
    values = np.asarray(values, dtype=np.float64)
    return np.where(np.isnan(values), default, values).astype(kind)
