"""Safe by default: --overwrite deletes only a run (or nothing), and credentials are never written or printed."""

import json
import os

import pytest
import s3fs
import yaml
from conftest import write_prompts

from jobs.cli import main
from jobs.decode import decode_spec
from jobs.resume import check_continuation
from jobs.spec import SpecError, spec_from_dict
from stages import columns as C

KEY, SECRET = "AKIDSAFETYKEY0042", "s3cr3t-SAFETY-0042"


def local_job(tmp_path, output):
    prompts = write_prompts(tmp_path / "p.parquet", [{C.PROMPT: "a cat"}])
    return spec_from_dict({"prompts": prompts, "output": str(output)})


def test_overwrite_refuses_a_folder_of_the_users_own_files(tmp_path, capsys):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_bytes(b"mine")
    (tmp_path / "job.yaml").write_text(yaml.safe_dump({"prompts": write_prompts(tmp_path / "p.parquet", [
        {C.PROMPT: "a cat"}]), "output": str(tmp_path / "photos"), "generation": {"height": 128, "width": 128}}))
    assert main(["generate", str(tmp_path / "job.yaml"), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(tmp_path / "photos") in err and "no job.yaml" in err
    assert (tmp_path / "photos" / "holiday.jpg").read_bytes() == b"mine"


def test_a_folder_of_other_files_is_not_taken_as_an_output(tmp_path):
    """A first run into a folder of the user's own files is refused: its job.yaml would make the folder a run,
    and a later --overwrite would delete the user's files with it."""
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_bytes(b"mine")
    with pytest.raises(SpecError, match="holds files but no run"):
        check_continuation(local_job(tmp_path, tmp_path / "photos"), overwrite=False)
    assert sorted(os.listdir(tmp_path / "photos")) == ["holiday.jpg"]
    (tmp_path / "empty").mkdir()
    check_continuation(local_job(tmp_path, tmp_path / "empty"), overwrite=False)  # an empty folder is fine


def test_overwrite_deletes_a_run_or_an_empty_folder(tmp_path):
    run = tmp_path / "run"
    (run / "manifest").mkdir(parents=True)
    (run / "job.yaml").write_text("prompts: x\n")
    (run / "manifest" / "part.parquet").write_bytes(b"x")
    check_continuation(local_job(tmp_path, run), overwrite=True)
    assert not run.exists()
    (tmp_path / "empty").mkdir()
    check_continuation(local_job(tmp_path, tmp_path / "empty"), overwrite=True)
    with pytest.raises(SpecError, match="holds files but no run"):
        (tmp_path / "file.txt").write_text("mine")
        check_continuation(local_job(tmp_path, tmp_path / "file.txt"), overwrite=True)
    assert (tmp_path / "file.txt").read_text() == "mine"


def test_overwrite_refuses_an_output_holding_what_the_job_reads(tmp_path, capsys):
    """A prompt table (or a run to decode) kept inside the output folder would be deleted by --overwrite before
    the job read it: one line naming it, nothing deleted."""
    out = tmp_path / "out"
    (out / "inputs").mkdir(parents=True)
    (out / "job.yaml").write_text("prompts: x\n")  # a run folder: --overwrite may delete it
    prompts = write_prompts(out / "inputs" / "p.parquet", [{C.PROMPT: "a cat"}])
    (tmp_path / "job.yaml").write_text(yaml.safe_dump({"prompts": prompts, "output": str(out)}))
    assert main(["generate", str(tmp_path / "job.yaml"), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: prompts {prompts}: inside the output {out}, which --overwrite deletes; move it out of "
                   f"the output folder, or choose another output")
    run = out / "runs" / "first"  # decode's source run inside its output
    (run / "embeddings").mkdir(parents=True)
    (run / "job.yaml").write_text(yaml.safe_dump({"prompts": prompts, "output": str(run)}))
    assert main(["decode", str(run), str(out), "--overwrite"]) == 2
    assert capsys.readouterr().err.startswith(f"error: decoded_from {run}: inside the output {out}")
    assert os.path.exists(prompts) and (run / "job.yaml").exists()
    (tmp_path / "link").symlink_to(out)  # the output named through a symlink, or with another protocol alias
    for output in (tmp_path / "link", f"file://{tmp_path / 'link'}"):
        (tmp_path / "job.yaml").write_text(yaml.safe_dump({"prompts": prompts, "output": str(output)}))
        assert main(["generate", str(tmp_path / "job.yaml"), "--overwrite"]) == 2
        assert capsys.readouterr().err.startswith(f"error: prompts {prompts}: inside the output ")
    assert os.path.exists(prompts)


def test_a_home_relative_output_is_under_home(tmp_path, monkeypatch):
    """`~/runs/a` is the user's home folder, as a shell reads it, not a folder named `~` here."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    spec = spec_from_dict({"prompts": "~/p.parquet", "output": "~/runs/a"})
    assert (spec.prompts, spec.output) == (str(tmp_path / "home" / "p.parquet"), str(tmp_path / "home" / "runs" / "a"))


SECRET_OPTIONS = {"key": KEY, "secret": SECRET, "connection_string": f"AccountName=a;AccountKey={SECRET}",
                  "headers": {"Authorization": f"Bearer {SECRET}"},
                  "client_kwargs": {"endpoint_url": f"http://{KEY}:{SECRET}@127.0.0.1:9"}}


def test_job_yaml_masks_every_form_of_credential():
    spec = spec_from_dict({"prompts": "p", "output": "o", "storage_options": SECRET_OPTIONS})
    written = yaml.safe_dump(spec.public_dict())
    assert KEY not in written and SECRET not in written
    assert spec.public_dict()["storage_options"]["client_kwargs"]["endpoint_url"] == "http://***@127.0.0.1:9"


@pytest.mark.parametrize("field", ["prompts", "output", "model.decoder"])
def test_credentials_in_a_uri_are_refused_without_showing_them(tmp_path, capsys, field):
    data = {"prompts": "p", "output": "o"}
    section, _, leaf = field.rpartition(".")
    (data.setdefault(section, {}) if section else data)[leaf] = f"s3://{KEY}:{SECRET}@bucket/x"
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(data))
    assert main(["generate", str(tmp_path / "job.yaml")]) == 2
    err = capsys.readouterr().err
    assert field in err and "credentials in a URI" in err and SECRET not in err and KEY not in err


@pytest.mark.parametrize("argv, named", [
    (["report", "run", "--storage-options", '{"key": "%s", "secret": "%s"' % (KEY, SECRET)], "storage"),
    (["decode", "run", "out", "--storage-options", "{'secret': '%s'}" % SECRET], "storage"),
    (["evaluate", "run", "--clip-model", "m", "--storage-options", '{"secret": "%s",}' % SECRET], "storage"),
    (["generate", "job.yaml", "--set", "storage_options.secret=[%s" % SECRET], "storage"),
    (["report", f"s3://{KEY}:{SECRET}@bucket/run"], "error: run: credentials in a URI"),
    # An option s3fs unpacks as a mapping, given the endpoint itself (its key forgotten): was "cannot write there
    # ('str' object has no attribute 'copy')"; now named before any store is asked.
    (["generate", "job.yaml", "--set", f"storage_options.client_kwargs=http://{KEY}:{SECRET}@127.0.0.1:9"],
     "storage_options.client_kwargs: expected a mapping"),
    (["report", "s3://bucket/run", "--storage-options", '{"config_kwargs": "%s"}' % SECRET],
     "--storage-options: config_kwargs: expected a JSON object"),
])
def test_mistyped_options_are_never_echoed(tmp_path, capsys, monkeypatch, argv, named):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "job.yaml").write_text("prompts: p\noutput: o\n")
    try:
        code = main(argv)
    except SystemExit as exit:
        code = exit.code
    out = capsys.readouterr()
    assert code == 2 and SECRET not in out.err + out.out and KEY not in out.err and named in out.err, out.err


@pytest.fixture(scope="module")
def s3_run(s3_server, tmp_path_factory, ray_cluster):
    """A finished run on S3 made through the CLI with credentials in its storage options; what it printed."""
    fs = s3fs.S3FileSystem(**s3_server)
    fs.mkdir("safety")
    local = tmp_path_factory.mktemp("safety")
    fs.put(write_prompts(local / "p.parquet", [{C.PROMPT: "a cat"}, {C.PROMPT: "a dog"}]), "safety/p.parquet")
    options = {**s3_server, "key": KEY, "secret": SECRET}  # moto accepts any key pair
    (local / "job.yaml").write_text(yaml.safe_dump({
        "prompts": "s3://safety/p.parquet", "output": "s3://safety/run", "storage_options": options,
        "generation": {"height": 128, "width": 128, "prior_steps": 2, "decoder_steps": 2},
        "stages": {"text": {"batch_size": 2}, "prior": {"batch_size": 2}, "decoder": {"batch_size": 2}}}))
    return fs, local, options


def test_credentials_are_in_nothing_a_run_writes_or_prints(s3_run, capfd):
    fs, local, options = s3_run
    assert main(["generate", str(local / "job.yaml")]) == 0
    assert main(["report", "s3://safety/run", "--storage-options", json.dumps(options)]) == 0
    printed = capfd.readouterr()
    fs.invalidate_cache()
    written = {path: fs.cat_file(path) for path in fs.find("safety/run")}
    assert any(p.endswith("job.yaml") for p in written) and any("/runs/" in p for p in written)
    assert any(p.endswith("report/index.html") for p in written) and any("/manifest/" in p for p in written)
    for secret in (KEY, SECRET):
        assert secret not in printed.out + printed.err
        assert not [path for path, data in written.items() if secret.encode() in data]


def test_decode_never_uses_the_masked_credentials_of_job_yaml(s3_run, monkeypatch):
    fs, _, options = s3_run
    if not fs.exists("safety/run/embeddings"):
        pytest.skip("needs the run of test_credentials_are_in_nothing_a_run_writes_or_prints")
    spec = decode_spec("s3://safety/run", "s3://safety/redecoded", [], {**options})
    assert spec.storage_options["key"] == KEY  # the command line's
    for name, value in (("AWS_ACCESS_KEY_ID", KEY), ("AWS_SECRET_ACCESS_KEY", SECRET),
                        ("AWS_ENDPOINT_URL", options["client_kwargs"]["endpoint_url"])):
        monkeypatch.setenv(name, value)  # how a user gives credentials without --storage-options
    spec = decode_spec("s3://safety/run", "s3://safety/redecoded", [], None)
    assert "key" not in spec.storage_options and "secret" not in spec.storage_options  # from the environment
    assert spec.storage_options["client_kwargs"] == options["client_kwargs"]  # what was not masked is kept
