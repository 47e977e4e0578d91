"""`m2f segment` end to end on a real local Ray: moto S3 in and out, the awkward-input corpus, re-runs,
kill-and-resume, and credentials that never leak.

One Ray for the module (the CLI reuses an initialised Ray); the kill test's subprocess starts its own.
Outputs are read back the way users read them: DuckDB over the Parquet files, pycocotools on the RLEs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from pycocotools import mask as mask_utils
from typer.testing import CliRunner

import m2f.jobs.segment.resume as resume
from m2f.cli import app
from m2f.jobs.common.configs import SegmentConfig
from m2f.jobs.segment.dataflow import actors_that_fit, capacity_warnings, resolve_device
from m2f.jobs.segment.resume import (
    drop_superseded_errors,
    ids_to_keys,
    isin_sorted,
    plan_work,
    scan_output,
    supersede,
)
from m2f.pipeline.schema import OUTPUT_SCHEMA, error_row, image_id, image_key, ok_row, rows_to_table
from m2f.pipeline.sources import list_inputs
from m2f.pipeline.storage import open_fs
from tests.conftest import TEST_AWS_ACCESS_KEY_ID, TEST_AWS_SECRET_ACCESS_KEY, TEST_SECRETS
from tests.corpus import write_corpus
from tests.processes import kill_tree
from tests.test_infer import png

REPO = Path(__file__).resolve().parent.parent
KILL_TIMEOUT_S = 240.0


def segment(*args: object) -> object:
    return CliRunner().invoke(app, ["segment", *map(str, args)], catch_exceptions=False)


def write_images(folder: Path, sizes: list[tuple[int, int]]) -> list[str]:
    uris = []
    for i, (w, h) in enumerate(sizes):
        path = folder / ("sub" if i % 3 == 0 else "") / f"img{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png(w, h, seed=i))
        uris.append(str(path))
    return uris


def rows_of(folder: Path, columns: str = "* exclude (processed_at)") -> list[dict]:
    """The dataset under `folder`, through DuckDB (timestamps left out: fetching them needs pytz)."""
    relation = duckdb.sql(f"select {columns} from read_parquet('{folder}/part-*.parquet')")
    return [dict(zip(relation.columns, values, strict=True)) for values in relation.fetchall()]


def decoded_masks(folder: Path) -> dict[str, list[np.ndarray]]:
    """image_uri -> its segments' masks, via `unnest(segments)` and pycocotools."""
    query = f"""
        select image_uri, height, width, s.rle.size as size, s.rle.counts as counts
        from (select image_uri, height, width, unnest(segments) as s from read_parquet('{folder}/part-*.parquet'))
    """
    masks: dict[str, list[np.ndarray]] = {}
    for uri, height, width, size, counts in duckdb.sql(query).fetchall():
        mask = mask_utils.decode({"size": size, "counts": counts.encode("ascii")})
        assert mask.shape == (height, width)
        masks.setdefault(uri, []).append(mask)
    return masks


def reports(folder: Path) -> list[dict]:
    paths = sorted(p for p in (folder / "_runs").glob("*.json") if p.name != "_lease.json")  # a killed run's lease
    return [json.loads(p.read_text()) for p in paths]


def assert_no_secrets(*texts: str, files: list[Path] = ()) -> None:
    for secret in TEST_SECRETS:
        for text in texts:
            assert secret not in text
        for path in files:
            assert secret.encode() not in path.read_bytes(), path


# --- S3 ------------------------------------------------------------------------------------------


def test_s3_in_s3_out_read_back_with_duckdb(ray_cluster, models, s3_server, s3_bucket, s3_fs, tmp_path, capfd) -> None:
    sizes = [(40, 30), (30, 40), (64, 64), (100, 20), (20, 100), (50, 50), (33, 17), (80, 60), (45, 60), (128, 96)]
    expected = {}
    for i, (w, h) in enumerate(sizes):
        key = f"{s3_bucket}/in/{'deep/er/' if i % 4 == 0 else ''}img {i}.png"
        s3_fs.pipe_file(key, png(w, h, seed=i))
        expected[f"s3://{key}"] = (w, h)
    s3_fs.pipe_file(f"{s3_bucket}/in/notes.txt", b"not an image")
    # Credentials twice over: in the environment (conftest) and as --storage-options.
    options = json.dumps({"key": TEST_AWS_ACCESS_KEY_ID, "secret": TEST_AWS_SECRET_ACCESS_KEY})
    result = segment(
        f"s3://{s3_bucket}/in/",
        f"s3://{s3_bucket}/out/",
        "--endpoint-url",
        s3_server,
        "--storage-options",
        options,
        "--model",
        models["semantic"],
        "--preview",
        2,
        "--batch-size",
        3,
    )
    assert result.exit_code == 0, result.output
    assert "images ok                10" in result.output and "non-image files skipped  1" in result.output

    local = tmp_path / "out"
    s3_fs.invalidate_cache()
    s3_fs.get(f"{s3_bucket}/out/", str(local), recursive=True)
    parts = sorted(local.glob("part-*.parquet"))
    assert parts and not list(local.glob(".*"))
    for part in parts:  # plain Arrow types: no Ray extension types, no pickled objects
        schema = pq.read_schema(part)
        assert [(f.name, f.type) for f in schema] == [(f.name, f.type) for f in OUTPUT_SCHEMA]
        assert not any(b"ray" in key.lower() or b"extension" in key.lower() for key in (schema.metadata or {}))

    rows = rows_of(local)
    assert sorted(r["image_uri"] for r in rows) == sorted(expected)
    for row in rows:
        assert row["status"] == "ok" and row["error"] is None and row["task"] == "semantic"
        assert (row["width"], row["height"]) == expected[row["image_uri"]]
        assert row["image_id"] == image_id(row["image_uri"]) and row["model"].startswith("tiny@")
    masks = decoded_masks(local)
    assert set(masks) == set(expected)
    for uri, image_masks in masks.items():
        w, h = expected[uri]
        np.testing.assert_array_equal(np.sum(image_masks, axis=0), np.ones((h, w)))  # a partition

    (report,) = reports(local)
    assert report["counts"]["ok"] == 10 and report["counts"]["error"] == 0
    assert report["skipped_files"]["count"] == 1 and report["exit_code"] == 0
    assert report["config"]["storage_options"] == {"key": "***", "secret": "***"}
    assert report["model"]["sha256"] and report["versions"]["ray"]
    assert len(list((local / "_previews").glob("*.png"))) == 2
    captured = capfd.readouterr()
    assert_no_secrets(result.output, captured.out, captured.err, files=[p for p in local.rglob("*") if p.is_file()])


# --- awkward inputs ------------------------------------------------------------------------------


def test_awkward_corpus_gives_one_row_per_image_and_the_exit_code_follows_the_error_rate(
    ray_cluster, models, tmp_path
) -> None:
    root, out = tmp_path / "corpus", tmp_path / "out"
    corpus = write_corpus(str(root))
    expected = corpus.uris(str(root))
    errors = sum(not e.ok for e in expected.values())

    result = segment(root, out, "--model", models["semantic"], "--max-error-rate", 0.5)
    assert result.exit_code == 0, result.output
    rows = rows_of(out)
    assert Counter(r["image_uri"] for r in rows) == Counter(list(expected))  # exactly one row each
    for row in rows:
        want = expected[row["image_uri"]]
        if want.ok:
            assert row["status"] == "ok", row
            assert (row["width"], row["height"]) == want.size
        else:
            assert row["status"] == "error" and row["error"].startswith(want.reason), row
            assert row["segments"] is None and row["width"] is None
    (report,) = reports(out)
    assert report["skipped_files"]["count"] == len(corpus.skipped)
    assert report["counts"]["error"] == errors and report["counts"]["ok"] == len(expected) - errors
    assert f"non-image files skipped  {len(corpus.skipped)}" in result.output

    # The same command with no tolerance: ok images are skipped, errors retried, still one row each.
    first_run = {r["image_uri"]: r["run_id"] for r in rows}
    again = segment(root, out, "--model", models["semantic"], "--max-error-rate", 0.0)
    assert again.exit_code == 1, again.output
    assert f"{errors} errors" in again.output and "exceeds --max-error-rate 0.0" in again.output
    rows = rows_of(out)
    assert Counter(r["image_uri"] for r in rows) == Counter(list(expected))
    for row in rows:
        retried = row["run_id"] != first_run[row["image_uri"]]
        assert retried == (row["status"] == "error")


# --- re-runs -------------------------------------------------------------------------------------


def test_rerun_skips_everything_and_overwrite_redoes_it(ray_cluster, models, tmp_path) -> None:
    source, out = tmp_path / "in", tmp_path / "out"
    uris = write_images(source, [(40, 30), (30, 40), (50, 50), (64, 20)])
    assert segment(source, out, "--model", models["semantic"]).exit_code == 0
    files = sorted(out.glob("part-*.parquet"))
    first = rows_of(out)
    assert sorted(r["image_uri"] for r in first) == sorted(uris)

    again = segment(source, out, "--model", models["semantic"])
    assert again.exit_code == 0, again.output
    assert "4 already done, 0 to process" in again.output
    assert sorted(out.glob("part-*.parquet")) == files and rows_of(out) == first
    assert reports(out)[-1]["counts"]["ok"] == 0 and reports(out)[-1]["counts"]["already_done"] == 4

    # Another model, whose default task is panoptic: --overwrite replaces every row.
    redo = segment(source, out, "--model", models["panoptic"], "--overwrite", "--batch-size", 2)
    assert redo.exit_code == 0, redo.output
    rows = rows_of(out)
    assert sorted(r["image_uri"] for r in rows) == sorted(uris)
    assert {r["task"] for r in rows} == {"panoptic"} and len({r["run_id"] for r in rows}) == 1
    assert rows[0]["run_id"] != first[0]["run_id"] and not set(files) & set(out.glob("part-*.parquet"))
    assert any(r["segment_count"] for r in rows)
    for image_masks in decoded_masks(out).values():
        assert np.sum(image_masks, axis=0).max() <= 1  # panoptic segments never overlap


# --- kill and resume -----------------------------------------------------------------------------


def test_rows_are_committed_while_the_run_goes_and_a_killed_run_resumes_exactly_once(ray_cluster, models, tmp_path):
    """Default settings (512 rows per file, 30 s flush): the first part file lands mid-run, and a SIGKILL of
    the whole process tree keeps it."""
    source, out = tmp_path / "in", tmp_path / "out"
    uris = write_images(source, [(64 + i % 5 * 8, 48) for i in range(1200)])
    log_path = tmp_path / "killed.log"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("M2F_ROWS_PER_FILE", None)
    command = [sys.executable, "-m", "m2f.cli", "segment", str(source), str(out), "--model", models["semantic"]]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + KILL_TIMEOUT_S
        while not list(out.glob("part-*.parquet")):
            assert process.poll() is None, log_path.read_text(errors="replace")
            assert time.monotonic() < deadline, "no part file appeared"
            time.sleep(0.05)
        assert process.poll() is None, "the first part file landed only as the run ended"
        (first,) = out.glob("part-*.parquet")
        assert pq.read_metadata(first).num_rows == 512
    finally:
        kill_tree(process)
    assert process.returncode == -signal.SIGKILL
    ((report,),) = [reports(out)]
    assert report["status"] == "running", "the run finished before it was killed"
    survivors = rows_of(out, "image_uri, run_id")
    assert 512 <= len(survivors) < len(uris)

    # What a kill mid-write leaves (a hidden temporary), and a visible file that is not ours.
    temporary = out / ".part-20990101T000000Z-dead.parquet.m2f-tmp-0123abcd"
    temporary.write_bytes(b"PAR1\x00\x00 half a file")
    (out / "part-not-parquet.parquet").write_bytes(b"garbage")

    result = segment(source, out, "--model", models["semantic"], "--batch-size", 8)
    assert result.exit_code == 0, result.output
    assert f"{len({r['image_uri'] for r in survivors})} already done" in result.output
    assert not temporary.exists() and (out / "_quarantine" / "part-not-parquet.parquet").exists()
    rows = rows_of(out, "image_uri, image_id, status, run_id")
    assert Counter(r["image_uri"] for r in rows) == Counter(uris)  # one row per image, no duplicates
    assert {r["status"] for r in rows} == {"ok"}
    assert {r["run_id"] for r in survivors} < {r["run_id"] for r in rows}  # the killed run's rows were kept
    assert_no_secrets(log_path.read_text(errors="replace"), result.output)


# --- bad arguments -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model", "{missing_model}"], "checkpoint not found"),
        (["--storage-options", '{"key": "m2f-test-key-AKIA9SECRET"'], "not valid JSON"),
        (["--storage-options", "[1, 2]"], "must be a JSON object"),
        (["--precision", "fp16", "--device", "cpu"], "fp16 needs a GPU"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(models, tmp_path, extra: list[str], message: str) -> None:
    source = tmp_path / "in"
    write_images(source, [(8, 8)])
    extra = [e.replace("{missing_model}", str(tmp_path / "nope.safetensors")) for e in extra]
    result = segment(source, tmp_path / "out", "--model", models["semantic"], *extra)
    assert result.exit_code == 2 and message in result.output
    assert_no_secrets(result.output)


def test_missing_input_exits_2(models, tmp_path) -> None:
    result = segment(tmp_path / "absent", tmp_path / "out", "--model", models["semantic"])
    assert result.exit_code == 2 and "does not exist" in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_exits_2(ray_cluster, models, tmp_path) -> None:
    source = tmp_path / "in"
    write_images(source, [(8, 8)])
    result = segment(source, tmp_path / "out", "--model", models["semantic"], "--device", "cuda")
    assert result.exit_code == 2 and "no GPU" in result.output


# --- the job's pure parts ------------------------------------------------------------------------


def test_image_ids_convert_to_the_uint64_keys_of_their_uris() -> None:
    uris = [f"s3://bucket/img {i}.jpg" for i in range(1000)] + ["/local/ümlaut.png"]
    keys = ids_to_keys(pa.array([image_id(u) for u in uris]))
    assert keys.dtype == np.uint64 and keys.tolist() == [image_key(u) for u in uris]
    assert ids_to_keys(pa.array([], pa.string())).shape == (0,)
    with pytest.raises(ValueError, match="16 hex digits"):
        ids_to_keys(pa.array(["not-a-hex-id-xyz"]))
    sorted_keys = np.unique(keys[:10])
    assert isin_sorted(keys[:20], sorted_keys).tolist() == [True] * 10 + [False] * 10
    assert not isin_sorted(keys, np.empty(0, np.uint64)).any()


def test_plan_skips_done_and_repeated_uris(tmp_path, monkeypatch) -> None:
    source = tmp_path / "in"
    uris = write_images(source, [(4, 4)] * 5)
    manifest = tmp_path / "list.txt"
    manifest.write_text("\n".join(uris + uris[:2]) + "\n")  # two URIs listed twice
    monkeypatch.setattr(resume, "WORK_CHUNK", 3)  # repeats across chunk boundaries too
    monkeypatch.setattr(resume, "WORK_FILE_ROWS", 2)  # a chunk's URIs over several files
    fs, root = open_fs(str(tmp_path / "work"), {})
    done = np.sort(np.array([image_key(uris[4])], np.uint64))
    plan = plan_work(list_inputs(str(manifest), {}), done, fs=fs, folder=root)
    assert (plan.listed, plan.duplicates, plan.already_done, len(plan.pending)) == (7, 2, 1, 4)
    assert plan.pending.tolist() == sorted(image_key(u) for u in uris[:4])
    files = [pq.read_table(path)["image_uri"].to_pylist() for path in plan.files]
    assert [u for f in files for u in f] == uris[:4]  # listing order kept
    assert max(len(f) for f in files) == 2 and len(files) == 3  # [u0 u1] [u2], then [u3]
    redo = plan_work(list_inputs(str(manifest), {}), np.empty(0, np.uint64), fs=fs, folder=root + "2")
    assert (redo.already_done, len(redo.pending)) == (0, 5)


def test_earlier_rows_of_redone_images_and_superseded_errors_are_rewritten_away(tmp_path) -> None:
    common = {"task": "semantic", "model": "tiny@0", "run_id": "r"}
    stats = {"segment_count": 0, "class_fractions": [], "mean_score": None}
    ok = [ok_row(f"/x/{i}.png", width=1, height=1, segments=[], stats=stats, inference_ms=1.0, **common) for i in "ab"]
    err = [error_row(f"/x/{i}.png", "not an image", **common) for i in "cd"]
    pq.write_table(rows_to_table([ok[0], err[0]]), tmp_path / "part-1.parquet")
    pq.write_table(rows_to_table([err[1]]), tmp_path / "part-2.parquet")
    pq.write_table(rows_to_table([ok[1]]), tmp_path / "part-3.parquet")
    fs, root = open_fs(str(tmp_path), {})
    existing = scan_output(fs, root, model="tiny@0", task="semantic")
    assert existing.ok_keys.tolist() == sorted(image_key(f"/x/{i}.png") for i in "ab")
    assert [Path(p).name for p in existing.with_errors] == ["part-1.parquet", "part-2.parquet"]
    pending = np.sort(np.array([image_key("/x/c.png"), image_key("/x/d.png")], np.uint64))
    assert supersede(fs, existing.with_errors, pending) == 2  # c and d were redone
    assert pq.read_table(tmp_path / "part-1.parquet")["image_uri"].to_pylist() == ["/x/a.png"]
    assert not (tmp_path / "part-2.parquet").exists() and (tmp_path / "part-3.parquet").exists()
    assert pq.read_schema(tmp_path / "part-1.parquet").equals(OUTPUT_SCHEMA)
    # An error row of an image that has an ok row elsewhere (a retry committed, then a kill) goes too.
    stale = [error_row("/x/b.png", "not an image", **common), error_row("/x/e.png", "not an image", **common)]
    pq.write_table(rows_to_table(stale), tmp_path / "part-4.parquet")
    assert drop_superseded_errors(fs, [str(tmp_path / "part-4.parquet")], existing.ok_keys) == 1
    assert pq.read_table(tmp_path / "part-4.parquet")["image_uri"].to_pylist() == ["/x/e.png"]


def test_device_resolution() -> None:
    assert resolve_device("auto", 0, 1.0) == "cpu" and resolve_device("auto", 2, 1.0) == "cuda"
    assert resolve_device("auto", 2, 0.0) == "cpu" and resolve_device("cpu", 2, 1.0) == "cpu"
    with pytest.raises(ValueError, match="no GPU"):
        resolve_device("cuda", 0, 1.0)
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        resolve_device("auto", 0, 1.0, "fp16")


def test_the_report_config_hides_secrets() -> None:
    options = json.dumps({"key": TEST_AWS_ACCESS_KEY_ID, "client_kwargs": {"region_name": "eu"}})
    config = SegmentConfig(
        input="s3://b/in", output="s3://b/out", endpoint_url="https://user:pw@minio:9000", storage_options_json=options
    )
    redacted = config.redacted()
    assert redacted["storage_options"] == {"key": "***", "client_kwargs": {"region_name": "eu"}}
    assert redacted["endpoint_url"] == "https://***@minio:9000"
    assert_no_secrets(json.dumps(redacted))
    assert SegmentConfig(input="a", output="b", storage_options_json="{oops").redacted()["storage_options"] == "***"


def test_an_actor_pool_that_leaves_no_cpu_is_flagged() -> None:
    config = SegmentConfig(input="a", output="b", actors=2, cpus_per_actor=1.0)
    assert capacity_warnings({"CPU": 4.0}, config, "cpu") == []
    (message,) = capacity_warnings({"CPU": 2.0}, config, "cpu")
    assert "may stall" in message
    assert "GPUs" in capacity_warnings({"CPU": 8.0, "GPU": 1.0}, config, "cuda")[0]


def test_the_actors_a_shrunken_cluster_holds_leave_a_cpu_for_the_prepare_stage() -> None:
    config = SegmentConfig(input="a", output="b", actors=3, cpus_per_actor=2.0, gpus_per_actor=1.0)
    assert actors_that_fit({"CPU": 16.0}, config, "cpu") == 3  # never more than asked for
    assert actors_that_fit({"CPU": 5.0}, config, "cpu") == 2  # 4 CPUs for two actors, one for prepare
    assert actors_that_fit({"CPU": 2.0}, config, "cpu") == 0
    assert actors_that_fit({}, config, "cpu") == 0
    assert actors_that_fit({"CPU": 16.0, "GPU": 1.0}, config, "cuda") == 1  # a GPU node lost
    assert actors_that_fit({"CPU": 16.0, "GPU": 1.0}, config, "cpu") == 3  # GPUs count only for cuda actors
