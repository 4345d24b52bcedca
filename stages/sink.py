"""The manifest's Ray Data sink: each block of finished rows becomes one Parquet object, written whole."""

from __future__ import annotations

import io
import uuid

import pyarrow.parquet as pq
from ray.data import Datasink
from ray.data.block import BlockAccessor

from stages import columns as C
from stages.output import MANIFEST, folder
from stages.storage import block_name, join, write_atomic


class ManifestSink(Datasink):
    """Writes each block of manifest rows as one Parquet object, atomically, as rows finish."""

    def __init__(self, output: str, storage_options: dict):
        self.output, self.storage_options = output, storage_options
        # A part's name: its rows and this pass. A retried write task of the pass overwrites its part; a later
        # pass never reuses the name of a part that a compaction replaced (its footer lists that name).
        self.pass_id = uuid.uuid4().hex

    def write(self, blocks, ctx) -> int:
        fs, root = folder(self.output, MANIFEST, self.storage_options)
        rows = 0
        for block in blocks:
            table = BlockAccessor.for_block(block).to_arrow()
            if table.num_rows:
                sink = io.BytesIO()
                pq.write_table(table, sink)
                name = block_name([self.pass_id, *table.column(C.ROW_ID).to_pylist()])
                write_atomic(fs, join(root, f"{name}.parquet"), sink.getvalue())
                rows += table.num_rows
        return rows
