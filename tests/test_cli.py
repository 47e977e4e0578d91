"""`m2f segment` as schedulers and newcomers use it: --json, --config, a quiet terminal, mistakes caught before
Ray starts, empty inputs, and instance output an analyst can use."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from tests.test_segment_job import REPO, reports, rows_of, segment, write_images


def test_json_report_is_stdouts_last_line_and_a_clean_run_prints_only_our_lines(models, tmp_path) -> None:
    source, out = tmp_path / "in", tmp_path / "out"
    write_images(source, [(40, 30), (30, 40), (50, 50)])
    job = tmp_path / "job.toml"
    job.write_text(f'input = "{source}"\noutput = "{out}"\nbatch-size = 3\nmodel = "{models["semantic"]}"\n')
    command = [sys.executable, "-m", "m2f.cli", "segment", "--config", str(job), "--batch-size", "2", "--json"]
    done = subprocess.run(
        command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    (line,) = done.stdout.strip().splitlines()  # nothing else on stdout
    report = json.loads(line)
    assert report["exit_code"] == 0 and report["status"] == "completed" and report["counts"]["ok"] == 3
    assert report["output"] == str(out) and report == reports(out)[-1] | {"finished_at": report["finished_at"]}
    assert report["config"]["batch_size"] == 2  # the command line wins over the file
    assert report["config"]["config_file"] == str(job) and report["config"]["input"] == str(source)
    # stderr: our lines only; Ray's warnings and its C++ core's messages are in the run's log.
    for noise in ("Token authentication", "core_worker.cc", "WARNING", "Traceback"):
        assert noise not in done.stderr, done.stderr
    assert done.stderr.startswith("m2f segment ") and "images ok" in done.stderr
    assert (out / "_runs" / f"{report['run_id']}.log").exists() and report["log"].endswith(".log")


@pytest.mark.parametrize(
    ("toml", "message"),
    [("bogus = 1\n", "unknown key 'bogus'"), ('batch_size = "x"\n', "'batch_size' in"), ("actors = 0\n", "actors")],
)
def test_a_bad_config_file_is_a_bad_argument(tmp_path, toml: str, message: str) -> None:
    job = tmp_path / "job.toml"
    job.write_text(toml)
    result = segment(tmp_path, tmp_path / "out", "--config", job)
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_input_and_output_must_come_from_somewhere(tmp_path) -> None:
    result = segment("--config", tmp_path / "missing.toml")
    assert result.exit_code == 2 and "cannot read" in result.output
    (tmp_path / "job.toml").write_text('input = "x"\n')
    result = segment("--config", tmp_path / "job.toml")
    assert result.exit_code == 2 and "OUTPUT is missing" in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--device", "cuda"], "no GPU"),
        (["--precision", "fp16"], "fp16 needs a GPU"),
    ],
)
def test_mistakes_fail_before_ray_starts_and_write_nothing(models, tmp_path, extra: list[str], message: str) -> None:
    source, out = tmp_path / "in", tmp_path / "out"
    write_images(source, [(8, 8)])
    started = time.monotonic()
    model = [] if "--model" in extra else ["--model", models["semantic"]]
    device = [] if "--device" in extra else ["--device", "cpu"]
    result = segment(source, out, *model, *device, *extra, "--json")
    assert result.exit_code == 2 and message in result.output, result.output
    assert time.monotonic() - started < 15
    assert not out.exists()
    assert json.loads(result.stdout.strip().splitlines()[-1])["exit_code"] == 2


def test_an_input_without_images_is_an_error_unless_allowed(ray_cluster, models, tmp_path) -> None:
    source = tmp_path / "in"
    source.mkdir()
    (source / "notes.txt").write_text("not an image")
    result = segment(source, tmp_path / "out", "--model", models["semantic"])
    assert result.exit_code == 1, result.output
    assert "no images found under" in result.output and "1 other files skipped" in result.output
    allowed = segment(source, tmp_path / "out2", "--model", models["semantic"], "--allow-empty")
    assert allowed.exit_code == 0, allowed.output
    # All images already done is not empty: exit 0.
    write_images(source, [(20, 20)])
    assert segment(source, tmp_path / "out3", "--model", models["semantic"]).exit_code == 0
    again = segment(source, tmp_path / "out3", "--model", models["semantic"])
    assert again.exit_code == 0 and "1 already done, 0 to process" in again.output


def test_instance_output_keeps_segments_scoring_at_least_one_half_by_default(ray_cluster, models, tmp_path) -> None:
    source = tmp_path / "in"
    write_images(source, [(64, 48), (48, 64), (64, 64), (80, 60)])
    common = ("--model", models["panoptic"], "--task", "instance", "--batch-size", 4)
    assert segment(source, tmp_path / "default", *common).exit_code == 0
    assert segment(source, tmp_path / "all", *common, "--score-threshold", 0).exit_code == 0
    default = rows_of(tmp_path / "default", "segments")
    everything = rows_of(tmp_path / "all", "segments")
    scores = [s["score"] for r in default for s in r["segments"] or []]
    all_scores = [s["score"] for r in everything for s in r["segments"] or []]
    assert all(s >= 0.5 for s in scores) and len(all_scores) > len(scores)
    assert all(s["area"] > 0 for r in everything for s in r["segments"] or [])  # no empty instances
    assert reports(tmp_path / "default")[-1]["config"]["score_threshold"] == 0.5
    assert reports(tmp_path / "all")[-1]["config"]["score_threshold"] == 0.0
