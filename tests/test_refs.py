"""Hub references are checked against the local Hugging Face cache first, then the hub with a short timeout."""

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
CHECK = ("from stages.refs import PRIOR_SUBFOLDERS, ModelRefError, check_ref\n"
         "try:\n    check_ref({ref!r}, 'prior', PRIOR_SUBFOLDERS, {{}})\n    print('ok')\n"
         "except ModelRefError as err:\n    print(err)\n")


def check_in(env: dict, ref: str) -> tuple[str, float]:
    """check_ref in a fresh process (the hub library reads its settings once, at import); its answer and time."""
    started = time.time()
    result = subprocess.run([sys.executable, "-c", CHECK.format(ref=ref)], capture_output=True, text=True,
                            cwd=ROOT, env={**os.environ, **env}, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip(), time.time() - started


@pytest.fixture
def hf_home(tmp_path):
    """An empty Hugging Face home, and a way to put a snapshot of a hub model with some subfolders into it."""

    def cache(repo: str, subfolders):
        entry = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
        (entry / "refs").mkdir(parents=True)
        (entry / "refs" / "main").write_text("abc123")
        for sub in subfolders:
            (entry / "snapshots" / "abc123" / sub).mkdir(parents=True)

    return tmp_path, cache


def test_offline_without_the_model_in_the_cache_is_one_line(hf_home):
    home, _ = hf_home
    answer, _ = check_in({"HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}, "warp-ai/wuerstchen-prior")
    assert answer == (f"model.prior: hub model warp-ai/wuerstchen-prior is not in the local Hugging Face cache "
                      f"({home / 'hub'}) and HF_HUB_OFFLINE is set; nor is there a local folder "
                      f"{ROOT / 'warp-ai' / 'wuerstchen-prior'}")  # a relative folder path reads like a hub id


def test_a_cached_snapshot_is_checked_offline_with_its_subfolders(hf_home):
    home, cache = hf_home
    cache("org/whole", ["prior", "text_encoder", "tokenizer", "scheduler"])
    cache("org/half", ["prior", "tokenizer"])
    env = {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    assert check_in(env, "org/whole")[0] == "ok"
    assert check_in(env, "org/half")[0] == "model.prior: org/half lacks the subfolder(s) text_encoder, scheduler"


def test_a_snapshot_holding_only_what_loading_fetched_is_checked_on_the_hub(hf_home):
    """A swept hub checkpoint's cached snapshot holds prior/ only (loading fetched nothing else): online, the hub
    is asked for its folders (here: out of reach, so said so), not the resume refused for a partial cache."""
    home, cache = hf_home
    cache("org/swept", ["prior"])
    answer, _ = check_in({"HF_HOME": str(home), "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}, "org/swept")
    assert answer.startswith("model.prior: cannot reach the Hugging Face Hub for org/swept (")


def test_an_unreachable_hub_is_one_line_within_seconds(hf_home):
    home, _ = hf_home
    env = {"HF_HOME": str(home), "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}  # nothing listens there
    answer, seconds = check_in(env, "warp-ai/wuerstchen-prior")
    assert answer.startswith("model.prior: cannot reach the Hugging Face Hub for warp-ai/wuerstchen-prior (")
    assert "HF_HUB_OFFLINE=1" in answer and "\n" not in answer
    assert seconds < 30  # the process start included; the check itself gives up after HUB_TIMEOUT_S


def test_a_hub_model_compares_by_content_with_a_local_copy(model_cache, tmp_path, monkeypatch):
    """A swept hub checkpoint is compared with model.prior by content: from the hub's file list (the LFS files'
    sha256, the small files read) it equals a folder with the same files, and offline its cached snapshot, which
    holds only what loading fetched (no model_index.json, no extra files), agrees with that folder too. The hub
    is unreachable here: its two calls are stood in."""
    import types

    import huggingface_hub
    from huggingface_hub import constants

    from stages.conditioning import conditioning, difference

    local = model_cache / "prior"
    files = {str(p.relative_to(local)): p for p in local.rglob("*") if p.is_file()}
    siblings = [types.SimpleNamespace(rfilename=name, lfs=types.SimpleNamespace(
        sha256=hashlib.sha256(path.read_bytes()).hexdigest()) if name.endswith(".safetensors") else None)
        for name, path in files.items()]
    downloaded = []

    def download(repo, name, revision, local_dir, etag_timeout):
        downloaded.append(name)
        target = Path(local_dir) / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(files[name].read_bytes())
        return str(target)

    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: types.SimpleNamespace(
        model_info=lambda repo, files_metadata, timeout: types.SimpleNamespace(sha="abc123", siblings=siblings)))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    assert conditioning("org/prior") == conditioning(str(local))
    assert not any(name.endswith(".safetensors") for name in downloaded)  # the weights: by their LFS sha256

    snapshot = tmp_path / "hub" / "models--org--prior" / "snapshots" / "abc123"
    for name in ("prior/config.json", "text_encoder/config.json", "text_encoder/model.safetensors",
                 "tokenizer/tokenizer.json", "scheduler/scheduler_config.json"):  # as the stages' loading left it
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_bytes(files[name].read_bytes())
    (tmp_path / "hub" / "models--org--prior" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--prior" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cached, expected = conditioning("org/prior"), conditioning(str(local))
    assert all(difference(part, expected[part], cached[part]) is None for part in expected)

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # another text encoder on the hub
    next(s for s in siblings if s.rfilename == "text_encoder/model.safetensors").lfs.sha256 = "0" * 64
    found = conditioning("org/prior")
    assert difference("text_encoder", expected["text_encoder"], found["text_encoder"]) == "model.safetensors"

