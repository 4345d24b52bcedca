"""The command line: bad input is one clear line and a non-zero exit before any model work or output."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import write_prompts

from jobs.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pq.write_table(pa.table({"prompt": ["a cat", "a dog"]}), tmp_path / "good.parquet")
    return tmp_path


def job_file(workdir, body):
    (workdir / "job.yaml").write_text(body)
    return str(workdir / "job.yaml")


BASE = "prompts: good.parquet\noutput: out\n"


@pytest.mark.parametrize("body, table, message", [
    (BASE, {"text": ["a"]}, "has no 'prompt' column"),
    (BASE, {"prompt": ["a", None]}, "row 1: prompt is null"),
    (BASE, {"prompt": ["a"], "height": [100]}, "row 0: height must be a positive multiple of 128"),
    (BASE, {"prompt": ["a"], "decoder_guidance_scale": [-1.0]}, "row 0: decoder_guidance_scale must not be negative"),
    (BASE, {"prompt": ["a"], "prior_steps": [0]}, "row 0: prior_steps must be at least 1"),
    (BASE, {"prompt": ["a"], "seed": [-5]}, "row 0: seed must not be negative"),
    (BASE + "generation: {widht: 512}\n", None, "generation.widht: unknown key (did you mean 'width'?)"),
    (BASE + "generation: {height: 500}\n", None, "generation.height: must be a positive multiple of 128"),
    (BASE + "generation: {prior_guidance_scale: -2}\n", None, "generation.prior_guidance_scale: must not be negative"),
    (BASE + "generation: {decoder_steps: 0}\n", None, "generation.decoder_steps: must be at least 1"),
    (BASE + "generation: {seed: -1}\n", None, "generation.seed: must not be negative"),
    (BASE + "model: {dtype: float64}\n", None, "model.dtype: unknown dtype 'float64'"),
    (BASE + "model: {prior: ./no/such/model}\n", None, "model.prior: directory ./no/such/model does not exist"),
    (BASE + "generation: {height: 512\n", None, "YAML syntax error"),
    ("prompts: missing.parquet\noutput: out\n", None, "prompts: "),
    ("prompts: job.yaml\noutput: out\n", None, "job.yaml is not a readable Parquet file"),
    (BASE + "decoded_from: runs/a\n", None, "decoded_from: set by `decode`"),  # was a full generate
])
def test_bad_input_is_one_line_and_writes_nothing(workdir, capsys, body, table, message):
    if table is not None:
        pq.write_table(pa.table(table), workdir / "good.parquet")
    code = main(["generate", job_file(workdir, body)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (workdir / "out").exists()


def test_bad_override_and_missing_job_file(workdir, capsys):
    assert main(["generate", job_file(workdir, BASE), "--set", "generation.hieght=512"]) == 2
    assert "generation.hieght: unknown key" in capsys.readouterr().err
    assert main(["generate", "nope.yaml"]) == 2
    assert "job file nope.yaml does not exist" in capsys.readouterr().err


def test_console_script_prints_no_traceback(workdir):
    path = job_file(workdir, BASE + "generation: {heigth: 512}\n")
    result = subprocess.run([sys.executable, "-m", "jobs.cli", "generate", path], capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "error: generation.heigth: unknown key (did you mean 'height'?)"


def test_a_store_out_of_reach_is_one_line_in_seconds(tmp_path, capsys):
    """Each command naming a store that cannot be connected to (a mistyped endpoint_url: here nothing listens)
    says so in one line naming the location, in seconds: with the store's default retries the first request
    alone takes over a minute."""
    port = socket.socket()
    port.bind(("127.0.0.1", 0))  # held, never listened on: connections are refused
    store = {"client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port.getsockname()[1]}"}, "key": "k", "secret": "s"}
    options = json.dumps(store)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"prompts": str(write_prompts(tmp_path / "p.parquet", [{"prompt": "a"}])),
                                   "output": "s3://bucket/new", "model": {"prior": "tiny", "decoder": "tiny"},
                                   "storage_options": store}))
    cases = [(["generate", str(job)], "output s3://bucket/new"), (["plan", str(job)], "output s3://bucket/new"),
             (["decode", "s3://bucket/run", str(tmp_path / "new"), "--storage-options", options], "run s3://bucket/run"),
             (["report", "s3://bucket/run", "--storage-options", options], "run s3://bucket/run"),
             (["evaluate", "s3://bucket/run", "--clip-model", "clip", "--storage-options", options],
              "run s3://bucket/run"),
             (["evaluate", str(tmp_path / "run"), "--clip-model", "clip", "--fid-reference", "s3://bucket/ref",
               "--storage-options", options], "--fid-reference s3://bucket/ref")]
    try:
        for argv, named in cases:
            started = time.time()
            assert main(argv) == 2, argv
            err = capsys.readouterr().err.strip()
            assert err.startswith(f"error: {named}: cannot connect to the object store (Could not connect"), err
            assert "endpoint_url" in err and "\n" not in err and time.time() - started < 30, (argv, err)
            assert ("--storage-options" in err) == (argv[0] not in ("generate", "plan")), err  # where a run's options come from
    finally:
        port.close()
    assert not (tmp_path / "new").exists()


HEAVY = ("torch", "ray", "diffusers", "transformers")
# Runs the command in-process and prints which heavy libraries it imported, after what it printed itself.
HARNESS = ("import json, sys\nfrom jobs.cli import main\ntry:\n    code = main(sys.argv[1:])\nexcept SystemExit as e:\n"
           "    code = e.code\nprint(json.dumps([code, sorted(m for m in %r if m in sys.modules)]))\n" % (HEAVY,))


def command(args, env=None, harness=False, timeout=600):
    """The CLI in a fresh process (cwd: the repository), without the test session's Ray address."""
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **(env or {})}
    argv = ["-c", HARNESS] if harness else ["-m", "jobs.cli"]
    started = time.time()
    result = subprocess.run([sys.executable, *argv, *args], capture_output=True, text=True, env=env, cwd=ROOT,
                            timeout=timeout)
    return result, time.time() - started


def test_help_and_spec_errors_import_no_heavy_library(workdir):
    for args in (["--help"], ["generate", "--help"], ["generate", job_file(workdir, BASE + "generation: {x: 1}\n")]):
        result, _ = command(args, harness=True)
        code, heavy = json.loads(result.stdout.strip().splitlines()[-1])
        assert code in (0, 2) and heavy == [], (args, heavy)


@pytest.fixture
def bad_models(s3_server, tmp_path):
    import s3fs

    s3fs.S3FileSystem(**s3_server).makedirs("models-bucket", exist_ok=True)
    return s3_server, tmp_path


@pytest.mark.parametrize("model, env, message", [
    ("warp-ai/wuerstchen-prior", {"HF_HUB_OFFLINE": "1"}, "model.prior: hub model warp-ai/wuerstchen-prior is "
                                                          "not in the local Hugging Face cache"),
    ("{tmp}/no-model", {}, "model.prior: directory {tmp}/no-model does not exist"),
    ("{tmp}/cut-model", {}, "model.prior: {tmp}/cut-model/prior/diffusion_pytorch_model.safetensors is not a "
                            "complete safetensors file"),
    ("s3://models-bucket/prior", {}, "model.prior: s3://models-bucket/prior does not exist"),
])
def test_a_missing_model_is_one_line_before_any_work(bad_models, model_cache, model, env, message):
    options, tmp_path = bad_models
    shutil.copytree(model_cache / "prior", tmp_path / "cut-model")  # the tiny prior, its weights cut short
    weights = tmp_path / "cut-model" / "prior" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    write_prompts(tmp_path / "p.parquet", [{"prompt": "a cat"}])
    job = {"prompts": str(tmp_path / "p.parquet"), "output": str(tmp_path / "out"), "storage_options": options,
           "model": {"prior": model.format(tmp=tmp_path)}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    (tmp_path / "hf").mkdir()
    result, seconds = command(["generate", str(tmp_path / "job.yaml")], env={"HF_HOME": str(tmp_path / "hf"), **env})
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [result.stderr.strip()]  # one line, no traceback, no Ray
    assert result.stderr.startswith("error: " + message.format(tmp=tmp_path))
    assert not (tmp_path / "out").exists()
    assert seconds < 30, seconds  # before any pool or model: about a second on an idle machine


def test_an_unwritable_output_is_one_line_naming_it(workdir):
    (workdir / "a-file").write_text("in the way")
    result, _ = command(["generate", job_file(workdir, BASE), "--set", f"prompts={workdir / 'good.parquet'}",
                         "--set", f"output={workdir / 'a-file' / 'out'}"])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: output {workdir / 'a-file' / 'out'}: cannot write "
                                                  f"there (Not a directory)"]


@pytest.fixture(scope="module")
def quiet_run(tmp_path_factory, model_cache):
    tmp_path = tmp_path_factory.mktemp("quiet")
    job = {"prompts": write_prompts(tmp_path / "p.parquet", [{"prompt": f"prompt {i}"} for i in range(4)]),
           "output": str(tmp_path / "out"),
           "generation": {"height": 128, "width": 128, "prior_steps": 2, "decoder_steps": 2},
           "stages": {"text": {"batch_size": 2}, "prior": {"batch_size": 2}, "decoder": {"batch_size": 2}}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    result, _ = command(["generate", str(tmp_path / "job.yaml")])
    return tmp_path, result


def test_a_normal_run_is_quiet_and_shows_one_progress_line_per_stage(quiet_run):
    _, result = quiet_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert "4 rows (0 failed); 4 made in" in result.stdout
    lines = result.stderr.splitlines()
    for noise in ("Traceback", "deprecated", "core_worker", "WARNING", "INFO", "it/s]"):
        assert noise not in result.stderr, noise
    assert len(lines) <= 12, result.stderr
    assert [re.sub(r"\d+\.\d\d", "R", line) for line in lines[-3:]] == [  # the closing state of each stage
        f"{stage:<8} 4/4 rows  R images/s  done" for stage in ("text", "prior", "decoder")]


def test_a_rerun_of_a_finished_job_answers_without_ray_or_models(quiet_run):
    tmp_path, first = quiet_run
    assert first.returncode == 0
    result, seconds = command(["generate", str(tmp_path / "job.yaml")], harness=True)
    *printed, last = result.stdout.strip().splitlines()
    assert json.loads(last) == [0, []]  # exit 0, and neither Ray, torch, diffusers nor transformers imported
    assert printed == [f"4 rows (0 failed), all made earlier: nothing to do; images in {tmp_path / 'out' / 'images'}, "
                       f"manifest in {tmp_path / 'out' / 'manifest'}, report in "
                       f"{tmp_path / 'out' / 'report' / 'index.html'}"]
    assert result.stderr == ""


def test_a_local_ray_without_the_asked_resources_fails_at_once(workdir):
    """RAY_ADDRESS=local is Ray's own way to say "start a local Ray": nothing more can join it, so there is no
    point waiting placement_timeout_s (300 s by default; 30 s here, so that the wrong answer shows sooner)."""
    result, seconds = command(["generate", job_file(workdir, BASE), "--set", f"prompts={workdir / 'good.parquet'}",
                               "--set", f"output={workdir / 'out'}", "--set", "stages.prior.num_gpus=1",
                               "--set", "placement_timeout_s=30"],
                              env={"RAY_ADDRESS": "local"})
    assert result.returncode == 2 and "waiting up to" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: stages.prior: no node")
    assert seconds < 120, seconds


def test_sigterm_interrupts_a_run_as_ctrl_c_does(workdir):
    """A scheduler's SIGTERM (Kubernetes, Slurm) mid-run: the interrupted line, exit 130, the lease given back
    (Ray's own handler dumped a native stack and exited without a word)."""
    pq.write_table(pa.table({"prompt": [f"prompt {i}" for i in range(40)]}), workdir / "many.parquet")
    path = job_file(workdir, "prompts: many.parquet\noutput: out\ngeneration: {height: 128, width: 128, prior_steps: "
                    "2, decoder_steps: 2}\nstages: {text: {batch_size: 4}, prior: {batch_size: 4}, "
                    "decoder: {batch_size: 4}}\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    run = subprocess.Popen([sys.executable, "-m", "jobs.cli", "generate", path], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env={**env, "PYTHONPATH": str(ROOT)}, cwd=workdir)
    deadline = time.time() + 300
    stored = workdir / "out" / "embeddings"
    while not list(stored.glob("*.parquet")) and run.poll() is None and time.time() < deadline:
        time.sleep(0.2)  # Stage C has stored rows: Ray runs the pass
    run.terminate()
    _, err = run.communicate(timeout=120)
    assert run.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("interrupted: run the same command again")
    assert not (workdir / "out" / "_lease").exists()


def test_sigterm_before_ray_starts_interrupts_too(workdir):
    """SIGTERM while the command still reads the prompt table (a FIFO here, which no one writes: its open waits)."""
    fifo = workdir / "slow.parquet"
    os.mkfifo(fifo)
    path = job_file(workdir, "prompts: slow.parquet\noutput: out\n")
    env = {**os.environ, "RAY_ADDRESS": "local"}  # not a cluster `ray start` left on this machine
    run = subprocess.Popen([sys.executable, "-m", "jobs.cli", "generate", path], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env={**env, "PYTHONPATH": str(ROOT)}, cwd=workdir)
    deadline = time.time() + 120
    while not _waits_on_a_fifo(run.pid) and run.poll() is None and time.time() < deadline:
        time.sleep(0.1)  # (opening the FIFO to write let the read go on, and fail, before the signal came)
    run.terminate()
    _, err = run.communicate(timeout=60)
    assert run.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("interrupted: run the same command again")


def _waits_on_a_fifo(pid: int) -> bool:
    """Whether a thread of process `pid` waits in the open of a FIFO (Linux: its wait channel)."""
    waits = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            waits.append((task / "wchan").read_text())
        except OSError:
            pass  # the thread ended
    return "wait_for_partner" in waits


def test_sigterm_as_ray_starts_interrupts_too(workdir):
    """SIGTERM while the command starts its first actor, just after ray.init: Ray's own handler exited with code
    15 and no word (a window of a second or two)."""
    path = job_file(workdir, BASE)
    script = ("import os, signal, sys\n"
              "from jobs import console\n"
              "first_actor = console.absorb_restart_warning\n"
              "def absorb():\n"
              "    os.kill(os.getpid(), signal.SIGTERM)  # handled at once, by whatever handler is set now\n"
              "    first_actor()\n"
              "console.absorb_restart_warning = absorb\n"
              "from jobs.cli import main\n"
              f"sys.exit(main(['generate', {path!r}]))\n")
    env = {**os.environ, "RAY_ADDRESS": "local"}  # not a cluster `ray start` left on this machine
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**env, "PYTHONPATH": str(ROOT)}, cwd=workdir)
    assert result.returncode == 130, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("interrupted: run the same command again")
    assert not (workdir / "out" / "_lease").exists()


def test_an_interrupted_retry_says_how_to_make_the_rows_it_took_out(monkeypatch, capsys):
    """--retry-failed takes the failed entries out first: "the same command" would find no failed row to retry."""
    import jobs.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "_dispatch", interrupted)
    assert main(["generate", "job.yaml", "--retry-failed"]) == 130
    assert "run the same command without --retry-failed to make the failed rows" in capsys.readouterr().err
    assert main(["generate", "job.yaml"]) == 130
    assert "run the same command again to continue" in capsys.readouterr().err


def test_each_commands_flags_reach_what_it_runs(tmp_path, monkeypatch, capsys):
    """Every flag of generate, decode, plan, tiny-model and evaluate arrives where the command hands it on (the
    callee records it here; what each does with it has its own tests): a flag dropped on the way is silent."""
    import types

    import jobs.decode
    import jobs.evaluate
    import jobs.plan
    import jobs.preflight
    import stages.presets
    from jobs.eval_args import EvalOptions, PoolOptions

    seen = {}

    def record(name, result):
        def callee(*args, **kwargs):
            seen[name] = (args, kwargs)
            return result
        return callee

    done = types.SimpleNamespace(failed=0, kept=0, unstored=0)
    monkeypatch.setattr(jobs.preflight, "generate_job", record("generate", done))
    monkeypatch.setattr(jobs.decode, "run_decode", record("decode", done))
    monkeypatch.setattr(jobs.plan, "plan", record("plan", "planned"))
    monkeypatch.setattr(stages.presets, "write_tiny_model", record("tiny-model", tmp_path / "m"))
    monkeypatch.setattr(jobs.evaluate, "evaluate", record("evaluate", {"images": 0, "failed": 0, "fid": None,
                                                                       "clip_score": None}))
    job = tmp_path / "job.yaml"
    job.write_text(f"prompts: {tmp_path / 'p.parquet'}\noutput: {tmp_path / 'out'}\n")
    assert main(["generate", str(job), "--set", "generation.height=512", "--verbose", "--retry-failed"]) == 0
    (spec,), options = seen["generate"]
    assert spec.generation.height == 512 and options == {"overwrite": False, "verbose": True, "retry_failed": True}
    assert main(["decode", "run", "again", "--set", "generation.decoder_steps=3", "--storage-options",
                 '{"anon": true}', "--overwrite", "--verbose"]) == 0
    assert seen["decode"] == (("run", "again", ["generation.decoder_steps=3"], {"anon": True}, True),
                              {"verbose": True})
    assert main(["plan", str(job), "--set", "generation.width=384"]) == 0
    assert seen["plan"][0][0].generation.width == 384
    assert main(["tiny-model", str(tmp_path / "m"), "--full-size"]) == 0
    assert seen["tiny-model"] == ((str(tmp_path / "m"),), {"full": True})
    assert "full-size random model written" in capsys.readouterr().out
    (tmp_path / "held" / "decoder").mkdir(parents=True)  # a model's folder: its weights would be replaced
    assert main(["tiny-model", str(tmp_path / "held")]) == 2
    assert "tiny-model: " + str(tmp_path / "held") + " already holds decoder/" in capsys.readouterr().err
    argv = ["evaluate", str(tmp_path / "out"), "--clip-model", "clip", "--fid-reference", "ref", "--inception", "inc",
            "--by", "seed", "--by", "seed", "height", "--batch-size", "7", "--concurrency", "3", "--num-gpus", "0.5",
            "--verbose"]
    assert main(argv) == 1  # not one image read: no metric
    assert seen["evaluate"] == ((EvalOptions(
        run=str(tmp_path / "out"), clip_model="clip", fid_reference="ref", inception="inc", by=("seed", "height"),
        storage_options={}, pools=PoolOptions(batch_size=7, concurrency=3, num_gpus=0.5), verbose=True),), {})
