"""The command line: bad input is one clear line and a non-zero exit before any model work or output."""

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.cli import main


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


def test_tiny_model_command(tmp_path, capsys):
    assert main(["tiny-model", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "prior" / "prior" / "config.json").exists()
    assert (tmp_path / "m" / "decoder" / "vqgan" / "config.json").exists()
    assert "tiny model written" in capsys.readouterr().out


def test_benchmark_reports_both_rates_and_their_ratio(ray_cluster, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["benchmark", "--rows", "12", "--height", "128", "--width", "128", "--json", str(out),
                 "--set", "generation.prior_steps=2", "--set", "generation.decoder_steps=2",
                 "--set", "stages.text.batch_size=4", "--set", "stages.prior.batch_size=4",
                 "--set", "stages.decoder.batch_size=4"]) == 0
    figures = json.loads(out.read_text())
    assert figures["pipeline_images_per_s"] > 0 and figures["diffusers_images_per_s"] > 0
    assert figures["ratio"] == pytest.approx(figures["pipeline_images_per_s"] / figures["diffusers_images_per_s"])
    assert "ratio pipeline / diffusers" in capsys.readouterr().out
