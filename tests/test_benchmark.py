"""The benchmark commands: figures and ratios, and their argument mistakes as one line before any work."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.cli import main


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
    rates = {mode: d["images_per_s"] for mode, d in figures["diffusers"].items()}
    assert set(rates) == {"combined", "batched"} and figures["diffusers_images_per_s"] == max(rates.values())
    assert f"ratio pipeline / diffusers ({figures['diffusers_mode']}, the faster)" in capsys.readouterr().out


def test_benchmark_and_file_mistakes_are_one_line_before_any_work(tmp_path, capsys, model_cache):
    (tmp_path / "half").mkdir()  # a model folder with the tiny prior and no decoder
    (tmp_path / "half" / "prior").symlink_to(model_cache / "prior")
    no_prompt = tmp_path / "np.parquet"
    pq.write_table(pa.table({"text": ["a"]}), no_prompt)
    (tmp_path / "file").write_text("x")
    (tmp_path / "latin1.yaml").write_bytes("prompts: caf\xe9\n".encode("latin-1"))
    cases = [(["benchmark", "--rows", "0"], "benchmark: --rows must be at least 1, got 0"),
             (["benchmark", "--rows", "8"], "benchmark: --rows must exceed twice the text batch size (64)"),
             (["benchmark", "--model", str(tmp_path / "none")], "is neither 'tiny' nor a folder holding prior/"),
             (["benchmark", "--prompts", str(no_prompt)], "not a Parquet/TSV table with a prompt or Prompt column"),
             (["generate", str(tmp_path)], f"job file {tmp_path}: cannot read it (is a directory)"),
             (["generate", str(tmp_path / "latin1.yaml")], "cannot read it (not UTF-8 text)"),
             (["tiny-model", str(tmp_path / "file")], "is a file, not a folder to write the model into"),
             (["tiny-model", str(tmp_path / "model")], "model already holds prior/; choose a new folder"),
             (["benchmark", "--json", str(tmp_path / "none" / "b.json")], "--json " + str(tmp_path / "none" / "b.json")
              + ": its folder does not exist"),
             (["benchmark", "--rows", "1", "--in-process", "--model", str(tmp_path / "half")],
              f"benchmark: --model: directory {tmp_path / 'half' / 'decoder'} does not exist"),
             (["benchmark", "--rows", "1", "--in-process", "--model", str(tmp_path / "model")],
              f"benchmark: --model: {tmp_path / 'model' / 'prior'} lacks the subfolder(s) prior, text_encoder"),
             (["benchmark", "--rows", "1", "--in-process", "--json", str(tmp_path)],
              f"benchmark: --json {tmp_path}: is a folder; name the JSON file to write"),
             (["benchmark", "--rows", "1", "--in-process", "--dtype", "bfloat16", "--psnr-rows", "-1"],
              "benchmark: --psnr-rows must not be negative (0: no PSNR pass), got -1"),
             (["evaluate", "run", "--clip-model", "m", "--num-gpus", "-1"], "--num-gpus must not be negative, got -1.0"),
             (["generate", "job.yaml", "--overwrite", "--retry-failed"], "--overwrite and --retry-failed: choose one")]
    (tmp_path / "model" / "prior").mkdir(parents=True)
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err and "Traceback" not in err, (argv, err)


def test_bench_scale_mistakes_are_one_line_before_anything_is_written(tmp_path, capsys, monkeypatch):
    import tempfile

    (tmp_path / "tmp").mkdir()
    (tmp_path / "work").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where a run without --work would build
    work = ["--rows", "10", "--work", str(tmp_path / "work")]
    cases = [(["--keep"], "bench-scale: --keep measures an output already built in --work: give --work DIR"),
             (["--keep", *work], f"bench-scale: --keep: {tmp_path / 'work'} holds no built output"),
             ([*work, "--part-rows", "0"], "bench-scale: --part-rows must be at least 1, got 0"),
             (["--rows", "0"], "bench-scale: --rows must be at least 1, got 0"),
             (["--new", "-1"], "bench-scale: --new must not be negative, got -1"),
             ([*work, "--steps", "report,reprot"], "bench-scale: --steps: no step 'reprot' (choose from rerun, ")]
    for argv, message in cases:
        assert main(["bench-scale", *argv]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err and "Traceback" not in err, (argv, err)
        assert not any((tmp_path / "work").iterdir()) and not any((tmp_path / "tmp").iterdir()), argv


def test_bench_scale_measures_its_bookkeeping_steps(tmp_path, capsys):
    """The report and evaluate steps run on a small synthetic output and say what they made (evaluate's step had
    failed since --by refused an axis of a value per row: it grouped by seed)."""
    argv = ["bench-scale", "--rows", "1200", "--part-rows", "400", "--work", str(tmp_path / "work"),  # > 1000 seeds
            "--steps", "report,evaluate-bookkeeping"]
    assert main(argv) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert "built 1200 done rows in 3 manifest parts" in out and "report/index.html" in out
    assert "(3 manifest parts, scores.parquet of 1200 rows)" in out
