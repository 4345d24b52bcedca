"""What each value of a job spec must be: one-line errors naming the key (types, ranges, sweep axes, URIs)."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import typing

import fsspec

from stages import columns as C
from stages import credentials as secrets
from stages.dtypes import COMPILE_MODES, DTYPE_NAMES
from stages.refs import prior_id
from stages.storage import reason

if typing.TYPE_CHECKING:
    from jobs.spec import JobSpec, StageSpec

IMAGE_FORMATS = ("png", "jpeg", "webp")
MAX_SEED = 2 ** 63 - 1  # seeds are signed 64-bit integers end to end (Parquet int64, torch's manual_seed)


class SpecError(ValueError):
    """A user mistake in the job spec or its inputs; the message is one line naming the field."""


def check_type(value, hint, name: str):
    """Accept `value` if it fits the annotation (ints for floats too); else a one-line error."""
    options = typing.get_args(hint) if typing.get_origin(hint) is typing.Union else (hint,)
    for option in options:
        if option is type(None) and value is None:
            return None
        if dataclasses.is_dataclass(option) and isinstance(value, option):
            return value
        if option is bool and isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option in (str, dict, list) and isinstance(value, option):
            return value
    wanted = " or ".join("null" if o is type(None) else o.__name__ for o in options)
    shown = "a value not shown (it may hold credentials)" if name.startswith("storage_options") else repr(value)
    raise SpecError(f"{name}: expected {wanted}, got {shown}")


def validate(spec: JobSpec) -> None:
    """Value checks that types alone cannot express."""
    gen = spec.generation
    check_generation_value("generation.height", gen.height)
    check_generation_value("generation.width", gen.width)
    check_generation_value("generation.prior_guidance_scale", gen.prior_guidance_scale)
    check_generation_value("generation.decoder_guidance_scale", gen.decoder_guidance_scale)
    check_generation_value("generation.decoder_steps", gen.decoder_steps)
    check_generation_value("generation.seed", gen.seed)
    check_text("generation.negative_prompt", gen.negative_prompt)
    if gen.prior_steps is not None:
        check_generation_value("generation.prior_steps", gen.prior_steps)
    if not 1 <= gen.images_per_prompt <= MAX_SEED:
        raise SpecError(f"generation.images_per_prompt: must be at least 1 and at most 2^63 - 1 (seed + image index "
                        f"is a signed 64-bit integer), got {gen.images_per_prompt}")
    check_prior_spec("model.prior", spec.model.prior)
    validate_sweep(spec.sweep)
    check_uris(spec)
    if key := secrets.misshapen(spec.storage_options):
        raise SpecError(f"storage_options.{key}: expected a mapping of options (as in client_kwargs: "
                        f"{{endpoint_url: …}}), got a value not shown (it may hold credentials)")
    for name, seed in [("generation.seed", gen.seed)] + [(f"sweep.seed[{i}]", v)
                                                         for i, v in enumerate(spec.sweep.get("seed") or [])]:
        if isinstance(seed, int) and seed + gen.images_per_prompt - 1 > MAX_SEED:
            raise SpecError(f"{name}: must be at most 2^63 - {gen.images_per_prompt} (seed + image index is a "
                            f"signed 64-bit integer), got {seed}")
    if spec.model.dtype not in DTYPE_NAMES:
        raise SpecError(f"model.dtype: unknown dtype {spec.model.dtype!r} (choose {' | '.join(DTYPE_NAMES)})")
    if not spec.placement_timeout_s >= 0:  # NaN too: a deadline never reached
        raise SpecError(f"placement_timeout_s: expected seconds, at least 0, got {spec.placement_timeout_s}")
    if spec.output_format not in ("files", "webdataset"):
        raise SpecError(f"output_format: {spec.output_format!r} is not one of files | webdataset")
    if spec.shard_size < 1:
        raise SpecError(f"shard_size: must be at least 1, got {spec.shard_size}")
    if spec.image_format not in IMAGE_FORMATS:
        raise SpecError(f"image_format: {spec.image_format!r} is not one of {' | '.join(IMAGE_FORMATS)}")
    for name in ("text", "prior", "decoder"):
        _validate_stage(f"stages.{name}", getattr(spec.stages, name))


MAX_SIDE = 2048  # the reference pipelines' range is 1024 … 2048 in 128-pixel steps (the tiny preset uses less)
_MULTIPLE_OF_128 = (lambda v: (v <= 0) | (v % 128 != 0) | (v > MAX_SIDE),
                    f"must be a positive multiple of 128 up to {MAX_SIDE}")
_NOT_NEGATIVE = (lambda v: v < 0, "must not be negative")
MAX_STEPS = 1000  # the schedules are made per step count: a mistyped 10^12 would fill memory, not run for ages
_STEPS = (lambda v: (v < 1) | (v > MAX_STEPS), f"must be at least 1 and at most {MAX_STEPS}")
# One rule per generation parameter, shared by the spec and the per-row columns: (bad-value mask, message).
GENERATION_RULES = {
    "height": _MULTIPLE_OF_128,
    "width": _MULTIPLE_OF_128,
    "prior_guidance_scale": _NOT_NEGATIVE,
    "decoder_guidance_scale": _NOT_NEGATIVE,
    "prior_steps": _STEPS,
    "decoder_steps": _STEPS,
    "seed": _NOT_NEGATIVE,
}


def check_generation_value(name: str, value, param: str | None = None) -> None:
    """Apply the rule of `param` (default: the last part of `name`) to one value."""
    param = param or name.rsplit(".", 1)[-1]
    is_bad, message = GENERATION_RULES[param]
    if isinstance(value, float) and not math.isfinite(value):
        raise SpecError(f"{name}: must be a finite number, got {value}")
    if isinstance(value, int) and abs(value) > MAX_SEED and param != "seed":  # the seed's own check names its bound
        raise SpecError(f"{name}: must fit a signed 64-bit integer, got {value}")
    if is_bad(value):
        raise SpecError(f"{name}: {message}, got {value}")


SWEEP_AXES = ("seed", "prior_guidance_scale", "decoder_guidance_scale", "prior_steps", "decoder_steps",
              "negative_prompt", C.RESOLUTION, "prior_checkpoint")


def check_uris(spec: JobSpec) -> None:
    """Refuse credentials written into a URI (user:password@), without showing them: they belong in
    storage_options (masked in job.yaml) or the environment; refuse memory:// where Ray's workers read or write,
    and a store fsspec cannot open."""
    in_workers = [("prompts", spec.prompts), ("output", spec.output), ("decoded_from", spec.decoded_from or "")]
    named = in_workers + [("model.decoder", spec.model.decoder)]
    priors = [("model.prior", spec.model.prior)] + [(f"sweep.prior_checkpoint[{i}]", p)
                                                   for i, p in enumerate(spec.sweep.get("prior_checkpoint") or [])]
    named += [(name, ref) for name, prior in priors
              for ref in (prior["interpolate"] if isinstance(prior, dict) else [prior])]
    for name, uri in in_workers[:2]:
        if not str(uri).strip():  # an unset variable in a template: "" would be the working directory
            raise SpecError(f"{name}: empty; give a path or URI")
    for name, uri in in_workers[1:]:
        path = str(uri).split("://", 1)[1].partition("/")[2] if "://" in str(uri) else str(uri)  # not a [host]
        if pattern := next((c for c in "*?[" if c in path), None):
            raise SpecError(f"{name} {uri}: a {pattern!r} in the path reads as a pattern (or, after '?', a URL "
                            f"query) to fsspec and Ray, which would miss the rows it holds; choose a path without")
    for name, uri in in_workers:  # read or written by Ray's worker processes
        if str(uri).startswith("memory://"):
            raise SpecError(f"{name}: memory:// lives in one process's memory, which the job's Ray workers cannot "
                            f"see; give a local path or an object store")
    for name, uri in named:
        if secrets.has_user_info(uri):
            raise SpecError(f"{name}: credentials in a URI (user:password@…) are not accepted and not shown; "
                            f"give them in storage_options or the environment")
    # Not prompts: a decode keeps its run's table, unread; generate names it as it lists it (jobs/prompts.py).
    for name, uri in in_workers[1:]:
        check_store(name, uri)


def check_store(name: str, uri: str | None) -> None:
    """A URI whose stores fsspec can open (a known protocol, its package installed: gs:// needs gcsfs), else one
    line naming the key or argument, the URI and why, as a prompt table that cannot be read is named."""
    for store in (uri or "").split("::"):  # a chained URI (tar://member::s3://b/shard.tar): each of its stores
        try:
            fsspec.get_filesystem_class(fsspec.core.split_protocol(store)[0] or "file")
        except (ValueError, ImportError) as err:
            raise SpecError(f"{name}: cannot open {uri} ({reason(err)})") from None


def check_prior_spec(name: str, prior) -> None:
    """A prior is a model reference, or {interpolate: [A, B], alpha: a} with 0 <= a <= 1."""
    if isinstance(prior, str):
        return
    if not isinstance(prior, dict) or set(prior) != {"interpolate", "alpha"}:
        raise SpecError(f"{name}: expected a model reference or {{interpolate: [A, B], alpha: 0.5}}, got {prior!r}")
    pair, alpha = prior["interpolate"], prior["alpha"]
    if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
        raise SpecError(f"{name}.interpolate: expected two model references, got {pair!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise SpecError(f"{name}.alpha: expected a number from 0 to 1, got {alpha!r}")


def validate_sweep(sweep: dict) -> None:
    """Known axes, each a non-empty list of values that pass the parameter's own rule."""
    for axis, values in sweep.items():
        name = f"sweep.{axis}"
        if axis not in SWEEP_AXES:
            close = difflib.get_close_matches(str(axis), SWEEP_AXES, n=1)
            raise SpecError(f"{name}: unknown axis" + (f" (did you mean '{close[0]}'?)" if close else
                                                      f" (axes: {', '.join(SWEEP_AXES)})"))
        if not isinstance(values, list) or not values:
            raise SpecError(f"{name}: expected a non-empty list of values, got {values!r}")
        for i, value in enumerate(values):
            _check_axis_value(f"{name}[{i}]", axis, value)


def sweep_warnings(sweep: dict) -> list[str]:
    """A warning for each sweep value that makes the same images as an earlier one of its axis (a repeat, 1 and
    1.0, two guidance scales of 1 or less): its rows are made once, or are the same images under other ids."""
    warnings = []
    for axis, values in sweep.items():
        seen = {}
        for i, value in enumerate(values):
            same = seen.setdefault(sweep_effect(axis, value), i)
            if same != i:
                why = (" (a guidance of 1 or less is no guidance)" if axis.endswith("guidance_scale")
                       and float(value) != float(values[same]) else "")
                warnings.append(f"warning: sweep.{axis}[{i}]: {value!r} makes the same images as sweep.{axis}[{same}] "
                                f"({values[same]!r}){why}: give each value once")
    return warnings


def sweep_effect(axis: str, value):
    """What a sweep value does to an image, comparable: equal for two values that make the same images."""
    if axis == "prior_checkpoint":
        if isinstance(value, dict) and value["alpha"] in (0, 1):  # an end of an interpolation is that checkpoint
            value = value["interpolate"][int(value["alpha"])]
        return prior_id(value)
    if axis.endswith("guidance_scale"):
        return max(float(value), 1.0)  # at 1 or less the pipelines run without guidance
    return json.dumps(value)


def check_text(name: str, value: str) -> None:
    """A text the CLIP tokenizer and Parquet can take: encodable as UTF-8 (a lone surrogate is not)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise SpecError(f"{name}: not valid Unicode text ({err.reason} at character {err.start})") from None


def _check_axis_value(name: str, axis: str, value) -> None:
    if axis == C.RESOLUTION:
        if not (isinstance(value, list) and len(value) == 2):
            raise SpecError(f"{name}: expected [height, width], got {value!r}")
        for side, v in zip(("height", "width"), value):
            check_generation_value(f"{name}.{side}", check_type(v, int, f"{name}.{side}"), side)
    elif axis == "prior_checkpoint":
        check_prior_spec(name, value)
    elif axis == "negative_prompt":
        check_text(name, check_type(value, str, name))
    elif not (axis == "prior_steps" and value is None):
        kind = float if axis.endswith("guidance_scale") else int
        check_generation_value(name, check_type(value, kind, name), axis)


def _validate_stage(name: str, stage: StageSpec) -> None:
    for key in ("batch_size", "micro_batch"):
        if getattr(stage, key) < 1:
            raise SpecError(f"{name}.{key}: must be at least 1, got {getattr(stage, key)}")
    if isinstance(stage.compile, str) and stage.compile not in COMPILE_MODES:
        raise SpecError(f"{name}.compile: expected true, false or {' | '.join(COMPILE_MODES)}, got {stage.compile!r}")
    conc = stage.concurrency
    if isinstance(conc, int) and conc < 1:
        raise SpecError(f"{name}.concurrency: must be at least 1, got {conc}")
    if isinstance(conc, list) and (len(conc) != 2 or not all(isinstance(c, int) and c >= 1 for c in conc)
                                   or conc[0] > conc[1]):
        raise SpecError(f"{name}.concurrency: expected n or [min, max] with 1 <= min <= max, got {conc}")
    for key in ("num_gpus", "num_cpus"):
        value = getattr(stage, key)
        if value is not None and value < 0:
            raise SpecError(f"{name}.{key}: must not be negative, got {value}")
    for resource, amount in (stage.resources or {}).items():
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not amount >= 0:
            raise SpecError(f"{name}.resources.{resource}: expected a non-negative number (how much of a custom "
                            f"resource one actor asks for), got {amount!r}")
