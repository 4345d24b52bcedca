"""Resume: what an output already holds (done rows, stored Stage C rows, their counts) and whether a spec may
continue it; the closing summary."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable

import yaml
from fsspec.implementations.local import LocalFileSystem

from jobs.lease import LEASE
from jobs.spec import JobSpec, SpecError, StagesSpec
from stages import footers
from stages import output as output_folder
from stages.storage import canonical, join, reason, remove_tree, url_to_fs, write_atomic

# Spec sections that change images: an output holds the rows of one setting of these.
IMAGE_KEYS = ("model", "generation", "image_format", "output_format")
# Stage settings that change the bits of the images (rows per model call, compiled kernels).
STAGE_IMAGE_KEYS = ("micro_batch", "compile")


# Spec sections that decide which rows an output should hold.
ROW_KEYS = ("prompts", "decoded_from", "sweep", *IMAGE_KEYS)


@dataclass(frozen=True)
class Summary:
    """What a finished job reports."""

    rows: int
    failed: int
    seconds: float
    output: str
    new: int  # rows this run recorded (the rest were done before it), failed ones included
    retried: int | None = None  # --retry-failed: the failed rows this run made again
    folded: int = 0  # input rows folded into an identical row (made once, counted in its input_rows)
    kept: int = 0  # failed entries whose rows the prompt table no longer plans (left as they are; not a failure)
    stale: int = 0  # entries whose rows the prompt table no longer plans, failed or not (an earlier table's)
    images: str = "images"  # the folder the images are in ("shards" for output_format webdataset)
    new_failed: int = 0  # of the `new` rows, those recorded with an error
    missing: int = 0  # --retry-failed: planned rows without an entry at all (at least these many)
    redecoded: int = 0  # --retry-failed: of the retried rows, those decoded from their stored Stage C output
    unstored: int = 0  # decode: made rows of the source run without stored Stage C embeddings (not decoded)
    unstored_failed: int = 0  # decode: rows that failed in the source run before Stage C output was stored
    source: str = ""  # decode: the source run

    @property
    def made(self) -> int:
        """Images this run made: rows it recorded without an error."""
        if self.retried is not None:
            return self.retried - (self.failed - self.kept)
        return self.new - self.new_failed

    @property
    def images_per_s(self) -> float:
        return self.made / self.seconds if self.seconds else 0.0

    def __str__(self) -> str:
        where = (f"images in {join(self.output, self.images)}, manifest in {join(self.output, 'manifest')}, "
                 f"report in {join(self.output, output_folder.REPORT, 'index.html')}")
        if self.retried is not None:  # every failed row planned was retried: the failures left are this run's
            again = self.failed - self.kept
            kept = (f"; {self.kept} failed rows the prompt table no longer plans were left as they are"
                    if self.kept else "")
            missing = (f"; {self.missing} planned rows have no entry yet: run without --retry-failed to make them"
                       if self.missing else "")
            if not self.retried:
                return f"no failed rows to retry ({self.rows} rows in all{kept}){missing}; {where}"
            stored = (f" ({self.redecoded} of them decoded from their stored Stage C output)"
                      if self.redecoded else "")
            return (f"retried {self.retried} failed rows{stored}: {self.retried - again} succeeded, {again} "
                    f"failed again ({self.rows} rows in all{kept}){missing} in {self.seconds:.1f} s; {where}")
        failed = f"{self.failed} failed" + (f", {self.kept} of them rows the prompt table no longer plans"
                                            if self.kept and not self.stale else "")
        stale = (f"; {self.stale} of the {self.rows} rows are an earlier table's that this one no longer plans"
                 + (f" ({self.kept} of the failed ones)" if self.kept else "")
                 + ", kept as they are: report and evaluate include them") if self.stale else ""
        if self.unstored:
            failed += (f"; {self.unstored} made rows of {self.source} have no stored Stage C embeddings (a deleted "
                       f"embeddings part?) and could not be decoded")
        if self.unstored_failed:
            failed += (f"; {self.unstored_failed} rows of {self.source} failed before their Stage C output was "
                       f"stored and are not decoded (--retry-failed them there first)")
        if not self.new:
            again = self.failed - self.kept
            retry = f" (--retry-failed makes the {again} failed rows again)" if again else ""
            return f"{self.rows} rows ({failed}), all made earlier: nothing to do{retry}{stale}; {where}"
        earlier = f", {self.rows - self.new} done earlier" if self.new != self.rows else ""
        earlier += f", {self.folded} identical input rows folded" if self.folded else ""
        failed_now = f", {self.new_failed} failed" if self.new_failed else ""
        return (f"{self.rows} rows ({failed}{earlier}); {self.made} made{failed_now} in "
                f"{self.seconds:.1f} s, {self.images_per_s:.2f} images/s{stale}; {where}")


def summarize(spec: JobSpec, seconds: float, before: tuple[int, int] = (0, 0), retried: int | None = None,
              kept: int = 0) -> Summary:
    """Count the manifest's rows and failures (from its Parquet footers); `before`: the (rows, failed rows) that
    were there already."""
    rows, failed, folded = footers.manifest_counts(spec.output, spec.storage_options)
    return Summary(rows=rows, failed=failed, seconds=seconds, output=spec.output, new=rows - before[0],
                   new_failed=max(failed - before[1], 0), retried=retried, folded=folded, kept=kept,
                   images=image_folder(spec))


def finished(spec: JobSpec, expected_rows: Callable[[], int], started: float) -> Summary | None:
    """The summary of an output that already holds every row of this spec (`expected_rows()` of them, none
    waiting in stored embeddings), from job.yaml, <output>/_finished and Parquet footers alone; None when there
    is work to do, or when the output cannot tell (the full path then checks everything and names what is wrong).
    The last invocation must have ended: one that claimed the output and died left a job.yaml newer than a table
    edited before it, whose new rows it never made."""
    try:
        return _finished(spec, expected_rows, started)
    except Exception:  # noqa: BLE001 - a shortcut only: any doubt takes the full path
        return None


def _finished(spec: JobSpec, expected_rows: Callable[[], int], started: float) -> Summary | None:
    fs, root = url_to_fs(spec.output, spec.storage_options)
    job_file = join(root, output_folder.JOB_FILE)
    if not fs.exists(job_file):
        return None
    before, now = output_folder.read_job(spec.output, spec.storage_options), spec.to_dict()
    record = output_folder.finished_record(spec.output, spec.storage_options)
    if (any(before.get(key) != now.get(key) for key in ROW_KEYS) or _stage_bits(before) != _stage_bits(now)
            or record is None or not _prompts_older(spec, fs, job_file)):
        return None
    rows, failed, folded = footers.manifest_counts(spec.output, spec.storage_options)  # folded: input rows an
    # entry stands for beside itself
    planned = expected_rows()  # each an entry or folded into one, or as the last invocation found nothing to make
    complete = rows + folded == planned or (record.get("planned"), record.get("entries")) == (planned, rows)
    if not complete or _rows_in_flight(spec, rows):
        return None
    return Summary(rows=rows, failed=failed, seconds=time.time() - started, output=spec.output, new=0,
                   folded=folded, images=image_folder(spec), kept=record.get("kept", 0), stale=record.get("stale", 0))


def _rows_in_flight(spec: JobSpec, entries: int) -> bool:
    """Whether embeddings/ holds more rows than the manifest's `entries` (Stage C rows stored, not yet decoded):
    only parts written since the last pass ended can (their footers are counted then: 39k parts at 10M rows)."""
    if not output_folder.written_since_closed(spec.output, spec.storage_options):
        return False
    return footers.part_counts(spec.output, output_folder.EMBEDDINGS, spec.storage_options)[0] > entries


def image_folder(spec: JobSpec) -> str:
    """Where a run's images are: images/, or shards/ for WebDataset output."""
    return output_folder.SHARDS if spec.output_format == "webdataset" else output_folder.IMAGES


def _prompts_older(spec: JobSpec, out_fs, job_file: str) -> bool:
    """Whether no prompt file changed after job.yaml was written: after the finished invocation claimed the
    output, before it read the table."""
    if spec.decoded_from:
        return True
    from jobs.prompts import list_files

    for cached in (out_fs, url_to_fs(spec.prompts, spec.storage_options)[0]):
        cached.invalidate_cache()  # fsspec keeps listings per filesystem instance: ask the store afresh
    fs, files = list_files(spec.prompts, spec.storage_options)
    written = out_fs.modified(job_file).timestamp()  # NotImplementedError where a store keeps no times
    return all(_changed(fs, f) <= written for f in files)


def _changed(fs, path: str) -> float:
    """When a file last changed here: its modification time, or on a local disk its inode's change time where later
    (`mv`, `cp -p` and `rsync -a` keep an older table's modification time; an object store's is its upload's)."""
    if isinstance(fs, LocalFileSystem):  # fsspec's "created" is the birth time where the OS keeps one
        stat = os.stat(path)
        return max(stat.st_mtime, stat.st_ctime)
    return fs.modified(path).timestamp()


def claim(spec: JobSpec, overwrite: bool) -> None:
    """Check the output may take this spec, then record the spec in it (job.yaml, written whole): the first
    thing a job writes, after every check; an output that cannot be written is one line naming it."""
    try:
        check_continuation(spec, overwrite)
        output_folder.mark_finished(spec.output, spec.storage_options, False)  # until this invocation ends
        fs, root = url_to_fs(spec.output, spec.storage_options)
        write_atomic(fs, join(root, output_folder.JOB_FILE), yaml.safe_dump(spec.public_dict(), sort_keys=False).encode())
    except SpecError:
        raise
    except Exception as err:  # noqa: BLE001 - permissions, a file in the way, a missing bucket: one line
        raise SpecError(f"output {spec.output}: cannot write there ({reason(err)})") from None


def check_continuation(spec: JobSpec, overwrite: bool, delete: bool = True) -> None:
    """Start afresh on --overwrite (only where the output holds a run or nothing; `delete` False: only that check);
    refuse an output holding rows of a different spec, naming the first difference (a job.yaml without rows, left
    by an attempt that failed early, is no reason to refuse)."""
    fs, root = url_to_fs(spec.output, spec.storage_options)
    job_file, lease = join(root, output_folder.JOB_FILE), join(root, LEASE)  # the lease: this invocation's
    if overwrite:
        if fs.exists(root) and not fs.exists(job_file) and (not fs.isdir(root) or _holds_files(fs, root, lease)):
            raise SpecError(f"output {spec.output} holds files but no run (no job.yaml): --overwrite deletes only "
                            f"a run folder or an empty one; choose another output")
        if delete and fs.exists(root):
            remove_tree(fs, root, keep=lease)
        return
    if not fs.exists(job_file):
        if fs.isdir(root) and _holds_files(fs, root, lease):
            raise SpecError(f"output {spec.output} holds files but no run (no job.yaml): a run goes into a folder "
                            f"of its own (a later --overwrite would delete everything in it); choose another output")
        return
    if not any(fs.glob(join(root, folder, "*.parquet")) for folder in ("manifest", "embeddings")):
        return
    before = output_folder.read_job(spec.output, spec.storage_options)
    if before.get("decoded_from"):  # as written before it was spelled one way (s3a://, a trailing slash)
        before["decoded_from"] = canonical(before["decoded_from"])
    now = spec.to_dict()
    before, now = _more_images_alike(before, now)
    diffs = [_first_difference(before.get(key), now.get(key), key) for key in ("decoded_from", *IMAGE_KEYS)]
    diffs.append(_first_difference(_stage_bits(before), _stage_bits(now), "stages"))
    if not _only_adds(before.get("sweep") or {}, now.get("sweep") or {}):
        diffs.append(_first_difference(before.get("sweep"), now.get("sweep"), "sweep"))
    for diff in filter(None, diffs):
        raise SpecError(f"output {spec.output} holds a run of another spec ({diff}); "
                        f"use --overwrite to start afresh, or another output")


def _more_images_alike(before: dict, now: dict) -> tuple[dict, dict]:
    """The two specs with `generation.images_per_prompt` left out where it grows: image k of a prompt keeps its
    seed (seed + k), so its row id, and a larger count only adds rows, as a sweep may gain values; a smaller one
    would leave rows the spec no longer plans, and stays a difference."""
    old, new = (data.get("generation") or {} for data in (before, now))
    if new.get("images_per_prompt", 1) < old.get("images_per_prompt", 1):
        return before, now
    return tuple({**data, "generation": {k: v for k, v in gen.items() if k != "images_per_prompt"}}
                 for data, gen in ((before, old), (now, new)))


def _holds_files(fs, root: str, lease: str) -> bool:
    """Whether a folder holds anything but this invocation's lease."""
    return any(fs._strip_protocol(path).rstrip("/") != fs._strip_protocol(lease) for path in fs.ls(root, detail=False))


def _stage_bits(data: dict) -> dict:
    """{name: {key: value}} of the image-changing stage keys (defaults where a job.yaml predates them)."""
    defaults, stages = StagesSpec(), data.get("stages") or {}
    return {name: {key: (stages.get(name) or {}).get(key, getattr(getattr(defaults, name), key))
                   for key in STAGE_IMAGE_KEYS} for name in ("text", "prior", "decoder")}


def _first_difference(old, new, path: str) -> str | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            diff = _first_difference(old.get(key), new.get(key), f"{path}.{key}")
            if diff:
                return diff
        return None
    return None if old == new else f"{path}: {old!r} → {new!r}"


def _only_adds(old: dict, new: dict) -> bool:
    """A sweep that keeps every earlier value of every earlier axis only adds rows."""
    return set(old) == set(new) and all(all(v in new[axis] for v in values) for axis, values in old.items())
