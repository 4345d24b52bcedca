"""The job spec: frozen dataclasses loaded from YAML, unknown keys rejected by name, `--set` overrides."""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from jobs.spec_rules import SpecError, check_type, validate  # noqa: F401 - SpecError: part of this module's interface
from stages import credentials as secrets
from stages.dtypes import MICRO_BATCH
from stages.storage import absolute, canonical

TASK_CPUS = 0.25  # reading, expanding and writing are light: never let them wait behind the actors
ACTOR_CPUS = 0.1  # a stage actor's default CPU reservation: its work is on the GPU, or in torch threads


@dataclass(frozen=True)
class ModelSpec:
    """Where the Stage C and Stage B/A checkpoints come from, and the compute dtype."""

    prior: typing.Union[str, dict] = "tiny"  # or {interpolate: [A, B], alpha: 0.3}: (1-alpha)·A + alpha·B
    decoder: str = "tiny"
    dtype: str = "float32"


@dataclass(frozen=True)
class GenerationSpec:
    """Defaults for every row; same-named prompt-table columns override them per row (stages/columns.OVERRIDABLE:
    all but images_per_prompt)."""

    height: int = 1024
    width: int = 1024
    prior_steps: typing.Optional[int] = None  # None → diffusers' DEFAULT_STAGE_C_TIMESTEPS
    prior_guidance_scale: float = 4.0
    decoder_steps: int = 12
    decoder_guidance_scale: float = 0.0
    negative_prompt: str = ""
    seed: int = 0
    images_per_prompt: int = 1


@dataclass(frozen=True)
class StageSpec:
    """Batch size and Ray placement of one stage's actor pool (passed to `map_batches`)."""

    batch_size: int = 8
    micro_batch: int = MICRO_BATCH  # rows per model call: fixes the bits of the output (so the run's identity); less memory
    compile: typing.Union[bool, str] = False  # torch.compile the stage's models (CUDA graphs on GPUs), or
    # "max-autotune" (Inductor also times its GEMM/conv templates at warm-up); changes bits: run identity too
    concurrency: typing.Union[int, list, None] = None  # n, or [min, max]
    num_gpus: typing.Optional[float] = None  # None → a default that depends on the cluster's GPUs
    num_cpus: typing.Optional[float] = None
    resources: typing.Optional[dict] = None
    accelerator_type: typing.Optional[str] = None
    label_selector: typing.Optional[dict] = None


@dataclass(frozen=True)
class StagesSpec:
    """One StageSpec per pool."""

    text: StageSpec = StageSpec(batch_size=64)
    prior: StageSpec = StageSpec(batch_size=16)
    decoder: StageSpec = StageSpec(batch_size=32)  # 4 micro-batches a call: host work overlaps GPU work


@dataclass(frozen=True)
class JobSpec:
    """A whole generation job."""

    prompts: str
    output: str
    storage_options: dict = field(default_factory=dict)
    model: ModelSpec = ModelSpec()
    generation: GenerationSpec = GenerationSpec()
    image_format: str = "png"
    output_format: str = "files"  # files: images/<row_id[:2]>/<row_id>.<ext>; webdataset: shards/*.tar
    shard_size: int = 1000  # webdataset: at most this many samples per tar
    stages: StagesSpec = StagesSpec()
    sweep: dict = field(default_factory=dict)  # axis → values; every prompt row × every combination
    placement_timeout_s: float = 300.0  # how long to wait for an existing cluster to offer the stages' resources
    decoded_from: typing.Optional[str] = None  # set by `decode`: the run whose Stage C embeddings are decoded

    def to_dict(self) -> dict:
        """Plain data (as loaded)."""
        return dataclasses.asdict(self)

    def public_dict(self) -> dict:
        """Plain data for job.yaml, with credentials in storage_options masked."""
        data = self.to_dict()
        data["storage_options"] = secrets.masked(data["storage_options"])
        return data


def stage_kwargs(spec: JobSpec, name: str) -> dict:
    """Constructor arguments of stage `name`'s class (TextEncoder, PriorStage, DecoderStage) from the spec."""
    models = {"text": dict(prior=spec.model.prior, decoder=spec.model.decoder),
              "prior": dict(prior=spec.model.prior), "decoder": dict(decoder=spec.model.decoder)}[name]
    stage = getattr(spec.stages, name)
    return dict(models, dtype=spec.model.dtype, storage_options=spec.storage_options,
                micro_batch=stage.micro_batch, compile=stage.compile)


def syntax_error(where: str, err: yaml.YAMLError) -> SpecError:
    """One line naming `where` and the line of a YAML syntax error."""
    mark = getattr(err, "problem_mark", None)
    line = f" line {mark.line + 1}" if mark else ""
    return SpecError(f"{where}{line}: YAML syntax error: {getattr(err, 'problem', err)}")


def load_spec(path: str | Path, overrides: list[str] = ()) -> JobSpec:
    """Read a YAML job file, apply `key.sub=value` overrides, validate."""
    try:
        data = yaml.load(Path(path).read_text(), Loader=_UniqueKeys)
    except FileNotFoundError:
        raise SpecError(f"job file {path} does not exist") from None
    except (IsADirectoryError, UnicodeDecodeError, PermissionError) as err:
        why = "not UTF-8 text" if isinstance(err, UnicodeDecodeError) else err.strerror.lower()
        raise SpecError(f"job file {path}: cannot read it ({why})") from None
    except yaml.YAMLError as err:
        raise syntax_error(f"job file {path}", err) from None
    except _TwiceError as err:
        raise SpecError(f"job file {path} line {err.line}: key '{err.key}' appears twice in one mapping (YAML "
                        f"would keep the last silently); merge them") from None
    if not isinstance(data, dict):
        raise SpecError(f"job file {path}: expected a mapping of keys, got {type(data).__name__}")
    return spec_from_dict(apply_overrides(data, overrides))


class _TwiceError(Exception):
    def __init__(self, key, line: int):
        super().__init__(key)
        self.key, self.line = key, line


class _UniqueKeys(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping (a second `generation:` block)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: merged below, its keys may repeat
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                if key in seen:
                    raise _TwiceError(key, key_node.start_mark.line + 1)
                seen.add(key)
            except TypeError:  # an unhashable key: yaml's own error says so below
                continue
        return super().construct_mapping(node, deep=deep)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set dotted keys (`generation.height=512`); values are parsed as YAML scalars/lists."""
    data = yaml.safe_load(yaml.safe_dump(data))  # deep copy
    seen = set()
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SpecError(f"--set {item}: expected key=value")
        if key.strip() in seen:  # as a key twice in the YAML: the first value would vanish without a word
            raise SpecError(f"--set {key.strip()}: given twice")
        seen.add(key.strip())
        *parents, leaf = key.strip().split(".")
        node = data
        for part in parents:
            if node.get(part) is None:  # absent, or a bare `model:` in the YAML
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise SpecError(f"--set {item}: {part} is not a mapping")
        try:
            node[leaf] = yaml.safe_load(raw)
        except yaml.YAMLError:
            shown = key if key.strip().startswith("storage_options") else item  # a credential is never echoed
            raise SpecError(f"--set {shown}: value is not valid YAML") from None
    return data


def spec_from_dict(data: dict) -> JobSpec:
    """Build and validate a JobSpec from plain data."""
    if isinstance(data, dict):
        secrets.remember(data.get("storage_options"))
    spec = _build(JobSpec, data, "")
    validate(spec)
    # Ray's workers on other nodes do not share the driver's working directory: local paths travel absolute
    spec = dataclasses.replace(spec, prompts=absolute(spec.prompts), output=absolute(spec.output),
                               decoded_from=spec.decoded_from and canonical(spec.decoded_from))
    if (canonical(spec.output) + "/").startswith(canonical(spec.prompts) + "/"):  # s3a:// is s3://
        raise SpecError(f"output {spec.output}: inside the prompts folder {spec.prompts}, whose Parquet files are "
                        f"all read as prompt tables (the run's own parts would be next time); choose an output "
                        f"outside it")
    return spec


def _build(cls, data, prefix: str):
    if not isinstance(data, dict):
        raise SpecError(f"{prefix.rstrip('.') or 'spec'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            _unknown(key, names, prefix)
    values = {}
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise SpecError(f"{name}: required key is missing")
            continue
        value, hint = data[f.name], hints[f.name]
        if dataclasses.is_dataclass(value):
            value = _shallow(value)
        if dataclasses.is_dataclass(hint):
            if value is not None and not isinstance(value, dict):
                raise SpecError(f"{name}: expected a mapping, got {value!r}")
            default = f.default if f.default is not dataclasses.MISSING else None
            values[f.name] = _build(hint, {**_shallow(default), **(value or {})}, name + ".")
        else:
            values[f.name] = check_type(value, hint, name)
    return cls(**values)


def _unknown(key, names: list[str], prefix: str):
    close = difflib.get_close_matches(str(key), names, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(names)})"
    raise SpecError(f"{prefix}{key}: unknown key{hint}")


def check_key(key: str) -> None:
    """A dotted key (`--set generation.height`) names a spec field, or a place inside a free-form mapping
    (storage_options, sweep); else the one-line error of an unknown key."""
    cls, prefix = JobSpec, ""
    for part in key.split("."):
        if not dataclasses.is_dataclass(cls):
            return
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:
            _unknown(part, list(fields), prefix)
        cls, prefix = typing.get_type_hints(cls)[part], f"{prefix}{part}."


def _shallow(obj) -> dict:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)} if obj is not None else {}
