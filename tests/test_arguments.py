"""Arguments bounded and named: every refusal is exit 2 and one short line, before Ray starts, that names the
option, never echoes a long value or a credential, and leaves nothing under OUTPUT. The pure helpers behind
them (user-info in URIs, where a path points, what a local Ray holds) are tested on their own first."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from m2f.cli import app
from m2f.jobs.common.arguments import check_local_capacity, local_resources
from m2f.jobs.common.configs import LIMITS, MAX_CONFIG_FILE_BYTES, SegmentConfig
from m2f.pipeline.paths import is_filesystem_root, normalised, same_or_under
from m2f.pipeline.secrets import has_userinfo, without_userinfo
from tests.test_segment_job import write_images

LONG = "x" * 100_000  # far over every limit; a message that quoted it would be 100 000 characters long
SECRET = "m2f-test-uri-secret-9q8w"

# --- user-info in URIs -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "masked"),
    [
        (f"s3://AKIAEXAMPLE:{SECRET}@bucket/in/", "s3://***@bucket/in/"),
        ("s3://user@bucket", "s3://***@bucket"),
        (f"https://u:{SECRET}@minio:9000", "https://***@minio:9000"),
        (f"s3://a@b:{SECRET}@host/key@2x.jpg", "s3://***@host/key@2x.jpg"),  # the authority's last "@" ends it
        ("file://user@host/data", "file://***@host/data"),
    ],
)
def test_user_info_is_found_in_the_authority_and_masked(uri: str, masked: str) -> None:
    assert has_userinfo(uri) and without_userinfo(uri) == masked


@pytest.mark.parametrize(
    "uri",
    ["s3://bucket/key@2x.jpg", "s3://bucket/a/b@c/d.png", "/data/user@host/img.png", "in@2x", "https://minio:9000/x"],
)
def test_an_at_sign_in_a_key_or_a_plain_path_is_not_user_info(uri: str) -> None:
    assert not has_userinfo(uri) and without_userinfo(uri) == uri


# --- where a path points ---------------------------------------------------------------------------


def test_one_spelling_per_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    spellings = ["out", "out/", "./out//", f"{tmp_path}/out", f"file://{tmp_path}/out/", f"file:{tmp_path}/out"]
    assert {normalised(s) for s in spellings} == {str(tmp_path / "out")}
    assert normalised("S3://bucket/prefix/") == normalised("s3://bucket/prefix") == "s3://bucket/prefix"
    assert normalised("s3://bucket/a//b") == "s3://bucket/a//b"  # an object store's key, as written
    assert normalised("C:/data/") == normalised("C:\\data") == "C:\\data"
    assert normalised("//data/out") == "/data/out" and normalised("file://") == str(tmp_path)  # as fsspec reads them


def test_same_or_under() -> None:
    assert same_or_under("/data/out/part-1.parquet", "file:///data/out/")
    assert same_or_under("/data/out", "/data/out/") and same_or_under("/anything", "/")
    assert not same_or_under("/data/outputs/x.png", "/data/out")  # a sibling sharing a prefix
    assert same_or_under("s3://b/out/_runs/r.json", "s3://b/out") and same_or_under("s3://b/x", "s3://b/")
    assert not same_or_under("s3://b/outputs", "s3://b/out") and not same_or_under("s3://bx/out", "s3://b")
    assert not same_or_under("s3://b/out", "gs://b/out")
    assert same_or_under("C:\\data\\out\\x.png", "C:/data/out") and not same_or_under("C:\\datax", "C:\\data")


@pytest.mark.parametrize("uri", ["/", "//", "/..", "file:///", "C:\\", "c:/", "s3://", "memory://"])
def test_filesystem_roots(uri: str) -> None:
    assert is_filesystem_root(uri)


@pytest.mark.parametrize("uri", ["s3://bucket", "s3://bucket/", "/data", "file:///data", "C:\\data", "out"])
def test_not_filesystem_roots(uri: str) -> None:
    assert not is_filesystem_root(uri)


def test_home_counts_where_it_points(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/")
    assert is_filesystem_root("~") and is_filesystem_root("~/")
    monkeypatch.setenv("HOME", "/root")
    assert not is_filesystem_root("~")


# --- what a local Ray holds --------------------------------------------------------------------------


def capacity(actors: int, cpus_per_actor: float = 1.0, gpus_per_actor: float = 1.0, *, device: str = "cpu", **have):
    check_local_capacity(
        actors=actors, cpus_per_actor=cpus_per_actor, gpus_per_actor=gpus_per_actor, device=device, **have
    )


def test_the_actors_of_a_local_ray_leave_one_cpu() -> None:
    capacity(3, cpus=4, gpus=0)  # three for the actors, one for reading and decoding
    capacity(6, 0.5, cpus=4, gpus=0)
    capacity(3, 0.1, cpus=1.3, gpus=0)  # 0.30000000000000004 is 0.3
    capacity(1000, 0.0, cpus=1, gpus=0)  # actors that take no CPU
    with pytest.raises(ValueError, match=r"--actors 4 x --cpus-per-actor 1 leave none of this machine's 4 CPUs"):
        capacity(4, cpus=4, gpus=0)
    with pytest.raises(ValueError, match="--ray-address"):
        capacity(1, cpus=1, gpus=0)  # a 1-CPU machine: the default pool would stall


def test_the_actors_of_a_local_ray_fit_its_gpus() -> None:
    capacity(2, device="cuda", cpus=8, gpus=2)
    capacity(4, gpus_per_actor=0.5, device="auto", cpus=8, gpus=2)
    capacity(4, device="cpu", cpus=8, gpus=1)  # CPU actors take no GPU
    capacity(4, device="auto", cpus=8, gpus=0)  # auto without a GPU runs on the CPU
    with pytest.raises(ValueError, match="3 x --gpus-per-actor 1 need more than this machine's 2 GPUs"):
        capacity(3, device="cuda", cpus=8, gpus=2)
    with pytest.raises(ValueError, match="need more than"):
        capacity(3, device="auto", cpus=8, gpus=2)
    with pytest.raises(ValueError, match="no GPU"):
        capacity(1, device="cuda", cpus=8, gpus=0)


def test_without_a_ray_in_this_process_the_machine_is_counted() -> None:
    import sys

    if sys.modules.get("ray") is not None and sys.modules["ray"].is_initialized():
        pytest.skip("a Ray runs in this process: its resources count instead")
    assert local_resources("cpu", 1.0) == (float(os.cpu_count() or 1), 0.0)


def test_every_limit_is_checked_at_both_ends() -> None:
    for name, (low, high) in LIMITS.items():
        for value in (high * 2 + 1, low - 1, float("nan")):
            config = SegmentConfig(input="a", output="b", **{name: value})
            with pytest.raises(ValueError, match=f"--{name.replace('_', '-')} must lie in"):
                config.validate()


# --- refusals through the CLI --------------------------------------------------------------------------


def invoke(*args: object) -> object:
    return CliRunner().invoke(app, [*map(str, args)], catch_exceptions=False)


def assert_refused(result, message: str, *, hidden: tuple[str, ...] = (LONG[:200], SECRET)) -> str:
    """Exit 2, one error line on stderr holding `message`, none of `hidden`; with --json, the 'invalid'
    result as stdout's last line. Returns the error line."""
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and message in line and len(line) < 400, line
    for text in hidden:
        assert text not in result.output
    if result.stdout.strip():  # --json
        last = json.loads(result.stdout.strip().splitlines()[-1])
        assert (last["status"], last["exit_code"]) == ("invalid", 2) and message in last["error"]
    return line


@pytest.fixture
def source(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    write_images(folder, [(8, 8)])
    return folder


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model", LONG], "--model is 100000 characters long; the most is 4096"),
        (["--preset", LONG], "--preset is 100000 characters long"),
        (["--ray-address", LONG], "--ray-address is 100000 characters long"),
        (["--storage-options", '{"key": "' + "k" * 70_000 + '"}'], "--storage-options is 70011 characters long"),
        (["--model", "demo\nsecond line"], "--model holds a control character (U+000A)"),
        (["--device", LONG], "must be one of auto, cpu, cuda"),
        (["--actors", 10_001], "--actors must lie in [1, 10000], got 10001"),
        (["--actors", 0], "--actors must lie in [1, 10000], got 0"),
        (["--batch-size", 1025], "--batch-size must lie in [1, 1024]"),
        (["--preview", 10_001], "--preview must lie in [0, 10000]"),
        (["--max-pixels", 2**31 + 1], "--max-pixels must lie in [1, 2147483648]"),
        (["--max-file-bytes", 0], "--max-file-bytes must lie in [1, 68719476736], got 0"),
        (["--max-file-bytes", 2**40], "--max-file-bytes must lie in [1, 68719476736]"),
        (["--cpus-per-actor", 1025], "--cpus-per-actor must lie in [0, 1024]"),
        (["--gpus-per-actor", -1], "--gpus-per-actor must lie in [0, 1024]"),
        (["--flush-seconds", 8 * 86400], "--flush-seconds must lie in [0.001, 604800]"),
        (["--grace-seconds", "inf"], "--grace-seconds must lie in [0, 604800], got inf"),
        (["--stall-timeout", "1e300"], "--stall-timeout must lie in [0.001, 604800], got 1e+300"),
        (["--actors", "1" * 5000], "--actors"),  # typer's own message: it never quotes the value
    ],
)
def test_values_out_of_bounds_are_refused_unechoed(tmp_path: Path, source: Path, extra: list, message: str) -> None:
    result = invoke("segment", source, tmp_path / "out", *extra, "--json")
    if "must be one of" in message or extra[1] == "1" * 5000:  # refused by typer, before the job: exit 2 too
        assert result.exit_code == 2 and message in result.output and LONG[:200] not in result.output
        assert "1" * 200 not in result.output
    else:
        assert_refused(result, message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["INPUT", "OUTPUT", "--model", "--endpoint-url"])
def test_credentials_in_a_uri_are_refused_and_masked(tmp_path: Path, source: Path, where: str) -> None:
    uri = f"s3://AKIAEXAMPLE:{SECRET}@bucket/data"
    args = {"INPUT": str(source), "OUTPUT": str(tmp_path / "out"), "--model": "demo", "--endpoint-url": None}
    args[where] = f"https://AKIAEXAMPLE:{SECRET}@minio:9000" if where == "--endpoint-url" else uri
    options = [x for name in ("--model", "--endpoint-url") if args[name] for x in (name, args[name])]
    line = assert_refused(invoke("segment", args["INPUT"], args["OUTPUT"], *options, "--json"), "holds credentials")
    assert f"{where} " in line and "***@" in line and "AWS_ACCESS_KEY_ID" in line and "--storage-options" in line
    assert not (tmp_path / "out").exists()


def test_an_at_sign_in_a_key_is_no_credential(tmp_path: Path) -> None:
    result = invoke("segment", tmp_path / "absent@2x", tmp_path / "out", "--model", "s3://bucket/m@2x.pkl")
    assert result.exit_code == 2 and "holds credentials" not in result.output  # refused for its missing INPUT


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (["train", f"s3://u:{SECRET}@bucket/data", "{out}"], "DATA s3://***@bucket/data holds credentials"),
        (["train", "{in}", "{out}", "--init", f"s3://u:{SECRET}@b/m.pt"], "--init s3://***@b/m.pt holds"),
        (["evaluate", f"s3://u:{SECRET}@b/run", "{in}/gt.json"], "PREDICTIONS s3://***@b/run holds"),
        (["export-coco", "{in}", f"s3://u:{SECRET}@b/r.json"], "RESULTS s3://***@b/r.json holds"),
        (["export-coco", "{in}", "{out}/r.json", "--endpoint-url", f"http://u:{SECRET}@h:9"], "--endpoint-url"),
        (["synth", f"s3://u:{SECRET}@b/synth"], "OUTPUT s3://***@b/synth holds"),
        (["train", LONG, "{out}"], "DATA is 100000 characters long"),
    ],
)
def test_other_commands_refuse_credentials_in_uris(tmp_path: Path, command: list[str], message: str) -> None:
    args = [a.replace("{in}", str(tmp_path / "in")).replace("{out}", str(tmp_path / "out")) for a in command]
    assert_refused(invoke(*args), message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("output", ["/", "file:///", "//", "/tmp/.."])
def test_a_filesystem_root_is_no_output(source: Path, output: str) -> None:
    assert_refused(invoke("segment", source, output), "is the root of a filesystem")


def test_home_as_a_root_is_no_output(source: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/")
    assert_refused(invoke("segment", source, "~"), "OUTPUT ~ (/) is the root of a filesystem")


@pytest.mark.parametrize("spelling", ["{in}", "{in}/", "{in}//", "file://{in}/", "in", "./in/"])
def test_output_that_is_input_is_refused(source: Path, monkeypatch: pytest.MonkeyPatch, spelling: str) -> None:
    monkeypatch.chdir(source.parent)
    before = sorted(source.rglob("*"))
    assert_refused(invoke("segment", source, spelling.replace("{in}", str(source)), "--json"), "OUTPUT is INPUT: ")
    assert sorted(source.rglob("*")) == before


def test_output_that_is_a_manifest_input_is_another_mistake(tmp_path: Path, source: Path) -> None:
    manifest = tmp_path / "list.txt"
    manifest.write_text(f"{source}/img001.png\n")
    result = invoke("segment", manifest, manifest)
    assert result.exit_code == 2 and "OUTPUT is INPUT" not in result.output and "is a file" in result.output


def test_an_output_under_a_file_names_output(tmp_path: Path, source: Path) -> None:
    # Tests run as root, whom chmod does not stop: a path under a regular file fails for everyone (ENOTDIR).
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    out = blocker / "out"
    line = assert_refused(invoke("segment", source, out, "--json"), f"cannot write to OUTPUT {out}: ")
    assert f"{blocker} is a file" in line and "cannot list" not in line
    assert blocker.read_text() == "not a folder"


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_an_output_where_no_folder_can_be_made_names_output(source: Path) -> None:
    # /proc takes no new entries, even from root: a real failure to write, unlike a chmod 555 folder.
    assert_refused(invoke("segment", source, "/proc/m2f-test-out"), "cannot write to OUTPUT /proc/m2f-test-out: ")
    assert not os.path.exists("/proc/m2f-test-out")


def test_actors_beyond_the_local_machine_are_refused(tmp_path: Path, source: Path) -> None:
    cpus, _ = local_resources("cpu", 0.0)
    actors = int(cpus)  # x 1 CPU each: none left for reading and decoding
    line = assert_refused(invoke("segment", source, tmp_path / "out", "--actors", actors), f"--actors {actors} x")
    assert "--ray-address" in line and not (tmp_path / "out").exists()


# --- --config ---------------------------------------------------------------------------------------


def config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.toml"
    path.write_text(text)
    return path


def test_a_config_file_over_a_mib_is_refused_unread(tmp_path: Path, source: Path) -> None:
    path = config(tmp_path, f'input = "{source}"\noutput = "{tmp_path / "out"}"\n# {"x" * 2 * MAX_CONFIG_FILE_BYTES}\n')
    assert_refused(invoke("segment", "--config", path, "--json"), "job.toml is over 1 MiB")
    assert not (tmp_path / "out").exists()


def test_two_spellings_of_one_key_are_refused_naming_both(tmp_path: Path, source: Path) -> None:
    path = config(tmp_path, f'input = "{source}"\noutput = "out"\nbatch-size = 2\nbatch_size = 3\n')
    assert_refused(invoke("segment", "--config", path), "both 'batch-size' and 'batch_size' in")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (f'model = "{LONG}"', "'model' in {file} is 100000 characters long; the most is 4096"),
        (f'device = "{LONG}"', "'device' in {file} is 100000 characters long"),
        (f"{LONG} = 1", "unknown key 'xxxxxxxxxx"),
        ('model = {name = "x"}', "'model' in {file} is a table; give one value"),
        (f'storage_options = {{key = "{SECRET}", when = 1979-05-27}}', "only strings, numbers, booleans"),
        ("storage_options = {client_kwargs = 5}", "'client_kwargs' must be a JSON object"),  # parsed as JSON
    ],
)
def test_bad_values_in_a_config_file_are_refused_unechoed(tmp_path: Path, source: Path, line: str, message: str):
    path = config(tmp_path, f'input = "{source}"\noutput = "{tmp_path / "out"}"\n{line}\n')
    assert_refused(invoke("segment", "--config", path), message.replace("{file}", str(path)))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "table", ["[storage_options]\nanon = true\n", 'storage_options = {client_kwargs = {region_name = "x"}}\n']
)
def test_a_storage_options_table_is_accepted(tmp_path: Path, table: str) -> None:
    path = config(tmp_path, f'input = "{tmp_path / "absent"}"\noutput = "{tmp_path / "out"}"\n{table}')
    result = invoke("segment", "--config", path)
    assert result.exit_code == 2 and "does not exist" in result.output  # got past the options to INPUT
    assert "JSON" not in result.output
