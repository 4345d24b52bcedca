"""The benchmark commands: figures and ratios, and their argument mistakes as one line before any work."""

import json
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from jobs.spec import SpecError
from stages import columns as C


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


def test_bench_scale_measures_its_bookkeeping_steps(tmp_path, capsys, monkeypatch):
    """The report and evaluate steps run on a small synthetic output and say what they made (evaluate's step had
    failed since --by refused an axis of a value per row: it grouped by seed); without --work the synthetic output
    is built in a temporary folder, deleted at the end (it was left behind)."""
    import tempfile

    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    argv = ["bench-scale", "--rows", "1200", "--part-rows", "400",  # > 1000 seeds
            "--steps", "report,evaluate-bookkeeping"]
    assert main(argv) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert f"built 1200 done rows in 3 manifest parts under {tmp_path / 'tmp'}" in out and "report/index.html" in out
    assert "(3 manifest parts, scores.parquet of 1200 rows)" in out
    assert not any((tmp_path / "tmp").iterdir())


def test_the_steady_state_starts_after_the_first_block_and_its_burst(tmp_path):
    """Rows finished at these times (s), the first block 2 rows: 4 rows after its end (t=1) over 5 s; rows written
    in one burst with the first block take no time of their own; too few rows to see a steady state is said."""
    from jobs.benchmark import steady_state_rate

    def rate(finished, skip=2):
        run = tmp_path / str(len(list(tmp_path.iterdir())))
        (run / "manifest").mkdir(parents=True)
        pq.write_table(pa.table({C.FINISHED_AT: pa.array(finished, pa.float64())}), run / "manifest" / "a.parquet")
        return steady_state_rate(str(run), skip)

    assert rate([6, 0, 2, 1, 5, 4]) == pytest.approx(4 / 5)
    assert rate([0, 0, 0, 1, 2]) == pytest.approx(2 / 2)
    for finished in ([0, 1, 2, 3], [0, 0, 0, 0, 0, 1]):
        with pytest.raises(SystemExit):
            rate(finished)


def test_the_figures_come_from_the_steady_state_and_the_faster_diffusers_way(tmp_path, monkeypatch):
    """The pipeline's figure is Ray's steady state, the end-to-end ratio its end to end, both against diffusers'
    faster way; --psnr-rows, --height and --width reach the work; nothing is left in the temp folder."""
    from jobs import benchmark
    from jobs.cli import parser

    seen = {}
    measured = {"stages": {}, "matmul_peak_tflops": 1.0, "in_process_images_per_s": 7.0, "in_process_mfu": 0.1,
                "in_process_warmup_s": 1.0, "failed_rows": 0}
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(benchmark, "in_process", lambda spec, texts: (
        seen.update(spec=spec, texts=texts) or dict(measured), np.zeros(len(texts))))
    monkeypatch.setattr(benchmark, "ray_rates", lambda spec, verbose=False: seen.update(ray_verbose=verbose) or {
        "ray_steady_images_per_s": 10.0, "ray_end_to_end_images_per_s": 4.0})
    monkeypatch.setattr(benchmark, "diffusers_rates", lambda spec, texts, compiled, modes: seen.update(
        modes=modes, compiled=compiled) or {"combined": (1.0, 0.1), "batched": (2.0, 0.2)})
    monkeypatch.setattr(benchmark, "psnr_vs_float32", lambda spec, texts, images, rows: (
        seen.update(psnr_rows=rows) or {"rows": rows, "mean": 30.0, "min": 25.0}))
    args = parser().parse_args(["benchmark", "--rows", "200", "--dtype", "bfloat16", "--psnr-rows", "3",
                                "--height", "256", "--width", "128"])
    figures = benchmark.run_benchmark(args)
    assert (figures["pipeline_images_per_s"], figures["ratio"], figures["end_to_end_ratio"]) == (10.0, 5.0, 2.0)
    assert seen["psnr_rows"] == 3 and (seen["spec"].generation.height, seen["spec"].generation.width) == (256, 128)
    assert list(tmp_path.iterdir()) == []  # its prompt table and run output were kept in /tmp for good
    assert seen["ray_verbose"] is False and seen["modes"] == ["combined", "batched"] and seen["compiled"] is False
    with pytest.raises(SpecError, match="--rows must exceed twice the text batch size"):
        benchmark.run_benchmark(parser().parse_args(["benchmark", "--rows", "128", "--skip-diffusers"]))
    # Each flag reaches the work: a compile mode, one diffusers way, a TSV's prompts, --verbose, --set.
    (tmp_path / "p.tsv").write_text("Prompt\nfirst\nsecond\n")
    seen.clear()
    benchmark.run_benchmark(parser().parse_args([
        "benchmark", "--rows", "4", "--compile", "max-autotune", "--diffusers", "combined", "--prompts",
        str(tmp_path / "p.tsv"), "--verbose", "--set", "stages.text.batch_size=1", "--set", "stages.prior.micro_batch=2"]))
    spec = seen["spec"]
    assert spec.stages.prior.compile == spec.stages.decoder.compile == "max-autotune" and seen["compiled"] is True
    assert seen["modes"] == ["combined"] and seen["texts"] == ["first", "second", "first", "second"]
    assert seen["ray_verbose"] is True and spec.stages.prior.micro_batch == 2
    # --in-process: no Ray pass; --skip-diffusers: no diffusers pass; a model folder's default size is 1024².
    from stages.presets import write_tiny_model

    seen.clear()
    figures = benchmark.run_benchmark(parser().parse_args([
        "benchmark", "--rows", "2", "--in-process", "--skip-diffusers", "--model",
        str(write_tiny_model(tmp_path / "model"))]))
    assert "ray_verbose" not in seen and "modes" not in seen and "ratio" not in figures
    assert (seen["spec"].generation.height, seen["spec"].generation.width) == (1024, 1024)


def test_tsv_prompts_and_the_argument_defaults(tmp_path):
    """A PartiPrompts TSV (commas inside prompts), cycled to --rows; the defaults the README gives."""
    from jobs.benchmark import benchmark_prompts
    from jobs.cli import parser

    (tmp_path / "p.tsv").write_text("Prompt\tCategory\nhello, world\tA\nsecond\tB\n")
    assert benchmark_prompts(3, str(tmp_path / "p.tsv")) == ["hello, world", "second", "hello, world"]
    args = parser().parse_args(["benchmark"])
    assert (args.rows, args.dtype, args.psnr_rows, args.diffusers, args.compile) == (
        256, None, 8, ["combined", "batched"], False)
    assert parser().parse_args(["benchmark", "--compile"]).compile is True


def test_psnr_of_uint8_images():
    from jobs.bench_stages import psnr

    images = np.zeros((2, 2, 2, 3), np.uint8)
    off_by_one = images.copy()
    off_by_one[1] += 1
    assert list(psnr(images, off_by_one)) == [np.inf, pytest.approx(10 * np.log10(255 ** 2))]
