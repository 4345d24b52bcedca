"""Model references and the tiny preset: official layouts that diffusers and transformers load unchanged."""

import json
from pathlib import Path

import fsspec

import pytest
from diffusers import DDPMWuerstchenScheduler
from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel, WuerstchenDiffNeXt, WuerstchenPrior
from transformers import CLIPTextModel, CLIPTokenizer

from stages.models import (
    DECODER_SUBFOLDERS,
    PRIOR_SUBFOLDERS,
    ModelRefError,
    check_ref,
    ref_kind,
    resolve,
)
from stages.presets import write_tiny_model


def test_wuerstchen_classes_are_where_we_import_them_from():
    import diffusers.pipelines.deprecated.wuerstchen as wuerstchen

    for name in ("WuerstchenPrior", "WuerstchenDiffNeXt", "PaellaVQModel", "WuerstchenCombinedPipeline",
                 "WuerstchenPriorPipeline", "WuerstchenDecoderPipeline"):
        assert hasattr(wuerstchen, name), f"diffusers moved {name}: pin diffusers to a tested range"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny"))


def test_tiny_model_has_the_official_layout(tiny_dir):
    for role, subfolders in (("prior", PRIOR_SUBFOLDERS), ("decoder", DECODER_SUBFOLDERS)):
        assert (tiny_dir / role / "model_index.json").exists()
        for sub in subfolders:
            assert (tiny_dir / role / sub).is_dir()
    assert not list(tiny_dir.rglob("*.bin")), "weights must be safetensors only"


def test_each_component_loads_with_its_own_class(tiny_dir):
    prior, decoder = str(tiny_dir / "prior"), str(tiny_dir / "decoder")
    kw = dict(use_safetensors=True)
    WuerstchenPrior.from_pretrained(prior, subfolder="prior", **kw)
    CLIPTextModel.from_pretrained(prior, subfolder="text_encoder", **kw)
    CLIPTokenizer.from_pretrained(prior, subfolder="tokenizer")
    DDPMWuerstchenScheduler.from_pretrained(prior, subfolder="scheduler")
    diffnext = WuerstchenDiffNeXt.from_pretrained(decoder, subfolder="decoder", **kw)
    PaellaVQModel.from_pretrained(decoder, subfolder="vqgan", **kw)
    CLIPTextModel.from_pretrained(decoder, subfolder="text_encoder", **kw)
    # Every block type of the real decoder: an attention level and effnet injection, not only "CT".
    assert "CTA" in diffnext.config.level_config and any(diffnext.config.inject_effnet)


def test_tokenizer_handles_unicode_and_truncates_at_77(tiny_dir):
    tokenizer = CLIPTokenizer.from_pretrained(str(tiny_dir / "prior"), subfolder="tokenizer")
    ids = tokenizer(["Würstchen 🌭 über 東京"], padding="max_length", max_length=77, truncation=True).input_ids[0]
    assert len(ids) == 77 and tokenizer.unk_token_id not in ids[1:ids.index(tokenizer.eos_token_id)]


def test_reference_kinds():
    assert ref_kind("tiny") == "tiny"
    assert ref_kind("warp-ai/wuerstchen-prior") == "hub"
    assert ref_kind("s3://bucket/models/prior") == "uri"
    assert ref_kind("./models/prior") == "local" and ref_kind("/abs/prior") == "local"


def test_missing_local_model_is_reported(tmp_path):
    with pytest.raises(ModelRefError, match="model.prior: directory .*nope does not exist"):
        check_ref(str(tmp_path / "nope"), "prior", PRIOR_SUBFOLDERS, {})
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "prior").mkdir()
    with pytest.raises(ModelRefError, match="lacks the subfolder"):
        check_ref(str(tmp_path / "half"), "prior", PRIOR_SUBFOLDERS, {})


def test_missing_or_broken_configs_are_named_before_any_model_work(tiny_dir, tmp_path):
    import shutil

    model = Path(shutil.copytree(tiny_dir / "decoder", tmp_path / "decoder"))
    check_ref(str(model), "decoder", DECODER_SUBFOLDERS, {})  # the intact copy passes
    (model / "vqgan" / "config.json").write_text("{bad")
    with pytest.raises(ModelRefError, match=r"model.decoder: .*vqgan/config.json is not a readable JSON file \(Exp"):
        check_ref(str(model), "decoder", DECODER_SUBFOLDERS, {})
    shutil.copy(tiny_dir / "prior" / "prior" / "config.json", model / "vqgan" / "config.json")  # another model's
    with pytest.raises(ModelRefError, match=r"model.decoder: .*vqgan/config.json is a WuerstchenPrior's, not a "
                                            r"PaellaVQModel's"):  # each actor failed on it, 500 lines, output claimed
        check_ref(str(model), "decoder", DECODER_SUBFOLDERS, {})
    config = json.loads((tiny_dir / "prior" / "prior" / "config.json").read_text())
    (model / "decoder" / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "_class_name"}))
    with pytest.raises(ModelRefError, match=r"model.decoder: .*/decoder/config.json does not describe a "
                                            r"WuerstchenDiffNeXt \(TypeError: "):  # no class named: built to see
        check_ref(str(model), "decoder", DECODER_SUBFOLDERS, {})
    shutil.copy(tiny_dir / "decoder" / "decoder" / "config.json", model / "decoder" / "config.json")
    shutil.copy(tiny_dir / "decoder" / "vqgan" / "config.json", model / "vqgan" / "config.json")
    (model / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(ModelRefError, match=r"model.decoder: .*decoder lacks scheduler/scheduler_config.json$"):
        check_ref(str(model), "decoder", DECODER_SUBFOLDERS, {})
    # The same model in an object store (fsspec's memory store stands in for S3): its configs are read there too.
    import fsspec

    store = fsspec.filesystem("memory")
    store.put(str(tiny_dir / "decoder"), "/m/decoder", recursive=True)
    check_ref("memory://m/decoder", "decoder", DECODER_SUBFOLDERS, {})
    store.pipe("/m/decoder/vqgan/config.json", b"{bad")
    with pytest.raises(ModelRefError, match=r"^model.decoder: memory://m/decoder/vqgan/config.json is not a readable"):
        check_ref("memory://m/decoder", "decoder", DECODER_SUBFOLDERS, {})
    store.rm("/m/decoder/scheduler/scheduler_config.json")
    store.pipe("/m/decoder/vqgan/config.json", (tiny_dir / "decoder" / "vqgan" / "config.json").read_bytes())
    with pytest.raises(ModelRefError, match=r"^model.decoder: memory://m/decoder lacks scheduler/scheduler_config"):
        check_ref("memory://m/decoder", "decoder", DECODER_SUBFOLDERS, {})
    store.rm("/m", recursive=True)


def test_unreadable_weights_are_named_before_any_model_work(tiny_dir, tmp_path):
    import shutil

    model = Path(shutil.copytree(tiny_dir / "prior", tmp_path / "prior"))
    check_ref(str(model), "prior", PRIOR_SUBFOLDERS, {})  # the intact copy passes
    weights = model / "prior" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # a copy cut short
    with pytest.raises(ModelRefError, match=f"model.prior: {weights} is not a complete safetensors file"):
        check_ref(f"file://{model}", "prior", PRIOR_SUBFOLDERS, {})  # a file:// URI is checked as the folder
    with pytest.raises(ModelRefError, match=f"model.prior: {weights} is not a complete safetensors file"):
        check_ref(str(model), "prior", PRIOR_SUBFOLDERS, {})
    weights.rename(weights.with_suffix(".bin"))  # pickle weights only
    with pytest.raises(ModelRefError, match=r"has no .safetensors weights in prior/ \(pickle weights are never"):
        check_ref(str(model), "prior", PRIOR_SUBFOLDERS, {})
    fs = fsspec.filesystem("memory")
    fs.put(str(model), "/unsafe/prior", recursive=True)
    with pytest.raises(ModelRefError, match="memory://unsafe/prior has no .safetensors weights in prior/"):
        check_ref("memory://unsafe/prior", "prior", PRIOR_SUBFOLDERS, {})


def test_weights_of_another_model_are_named_before_any_model_work(tiny_dir, tmp_path):
    """A config that does not match its weights failed in every stage actor after the output was claimed (a shape
    ValueError), and a partial checkpoint left tensors unloaded: both are one line naming the folder."""
    import shutil

    from safetensors.torch import load_file, save_file

    model = Path(shutil.copytree(tiny_dir / "prior", tmp_path / "prior"))
    config = json.loads((model / "prior" / "config.json").read_text())
    (model / "prior" / "config.json").write_text(json.dumps({**config, "c": config["c"] * 2}))  # a bigger model's
    with pytest.raises(ModelRefError, match=rf"^model.prior: {model}/prior: tensor \S+ has shape \[{config['c']}, .*"
                                            rf"where its config.json makes \[{config['c'] * 2}, .*different models$"):
        check_ref(str(model), "prior", PRIOR_SUBFOLDERS, {})
    (model / "prior" / "config.json").write_text(json.dumps(config))
    weights = model / "prior" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    save_file(dict(sorted(tensors.items())[1:]), weights)  # one tensor short
    with pytest.raises(ModelRefError, match=rf"^model.prior: {model}/prior: the weights lack 1 of the {len(tensors)} "
                                            rf"tensors of WuerstchenPrior \(e.g. {min(tensors)}\)"):
        check_ref(str(model), "prior", PRIOR_SUBFOLDERS, {})
    # Only the files diffusers loads count: a folder holding a variant alone fails to load, and sharded weights are
    # the shards their index lists.
    weights.rename(weights.with_suffix(".fp16.safetensors"))
    with pytest.raises(OSError):
        WuerstchenPrior.from_pretrained(str(model), subfolder="prior", use_safetensors=True)
    with pytest.raises(ModelRefError, match=r"^model.prior: .*/prior: no diffusion_pytorch_model.safetensors \(nor its "
                                            r"index\), which diffusers loads: .*fp16.safetensors is not"):
        check_ref(str(model), "prior", PRIOR_SUBFOLDERS, {})
    weights.with_suffix(".fp16.safetensors").unlink()
    WuerstchenPrior.from_pretrained(str(tiny_dir / "prior"), subfolder="prior").save_pretrained(
        str(model / "prior"), max_shard_size="40KB")
    shards = sorted((model / "prior").glob("*-of-*.safetensors"))
    assert len(shards) > 1 and not weights.exists()
    check_ref(str(model), "prior", PRIOR_SUBFOLDERS, {})  # sharded, whole: passes
    shards[-1].unlink()
    with pytest.raises(ModelRefError, match=rf"prior: diffusion_pytorch_model.safetensors.index.json lists "
                                            rf"{shards[-1].name}, which is not there"):
        check_ref(str(model), "prior", PRIOR_SUBFOLDERS, {})
    shutil.rmtree(model / "prior")
    shutil.copytree(tiny_dir / "prior" / "prior", model / "prior")
    save_file(dict(sorted(tensors.items())[1:]), weights)  # one tensor short, again
    # In an object store the headers are read by range (fsspec's memory store stands in for S3).
    store = fsspec.filesystem("memory")
    store.put(str(model), "/mismatch/prior", recursive=True)
    with pytest.raises(ModelRefError, match=r"^model.prior: memory://mismatch/prior/prior: the weights lack 1 of"):
        check_ref("memory://mismatch/prior", "prior", PRIOR_SUBFOLDERS, {})
    store.pipe("/mismatch/prior/prior/diffusion_pytorch_model.safetensors",
               (tiny_dir / "prior" / "prior" / "diffusion_pytorch_model.safetensors").read_bytes())
    check_ref("memory://mismatch/prior", "prior", PRIOR_SUBFOLDERS, {})  # the intact weights pass
    pointer = b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n"  # cloned without git-lfs
    store.pipe("/mismatch/prior/prior/diffusion_pytorch_model.safetensors", pointer)
    with pytest.raises(ModelRefError, match=r"^model.prior: memory:///?mismatch/prior/prior/diffusion_pytorch_model"
                                            r".safetensors is not a complete safetensors file \(its header would be"):
        check_ref("memory://mismatch/prior", "prior", PRIOR_SUBFOLDERS, {})  # not the whole object fetched
    store.rm("/mismatch", recursive=True)


def test_object_store_models_are_copied_once_per_node(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WUERSTCHEN_BATCH_CACHE", str(tmp_path / "cache"))
    fs = fsspec.filesystem("memory")
    fs.put(str(tiny_dir / "prior"), "/models/prior", recursive=True)
    check_ref("memory://models/prior", "prior", PRIOR_SUBFOLDERS, {})
    local = resolve("memory://models/prior", "prior")
    assert (Path(local) / "prior" / "config.json").exists()
    fs.rm("/models/prior", recursive=True)  # a second resolve must not need the store again
    assert resolve("memory://models/prior", "prior") == local
    with pytest.raises(ModelRefError, match="memory://models/prior does not exist"):
        check_ref("memory://models/prior", "prior", PRIOR_SUBFOLDERS, {})
