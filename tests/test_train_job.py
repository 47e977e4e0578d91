"""`m2f train` on Ray Train, for real: 2 CPU workers (gloo DDP), checkpoints, kill and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from m2f import model as m2f
from m2f.cli import app
from m2f.jobs.common.configs import TrainConfig
from m2f.jobs.train.setup import build_for_training, lr_factor, param_groups
from m2f.model.config import DecoderConfig, ModelConfig, PixelDecoderConfig, ResNetConfig
from m2f.pipeline.training.synthetic import SYNTHETIC_CATEGORIES, generate
from tests.processes import descendants, kill_tree

FAST = ["--image-size", "64", "--min-scale", "0.8", "--max-scale", "1.0", "--num-points", "256", "--batch-size", "1"]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("scenes")
    generate(str(root), 6, seed=3)
    return str(root)


def train_command(data: str, out: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "m2f.cli", "train", data, out, *args, *FAST]


def test_two_workers_train_quietly_from_relative_paths_and_write_a_loadable_model(scenes, tmp_path):
    """A scheduler's view: relative DATA and OUTPUT (Ray Train runs workers elsewhere), no terminal, and
    only our lines on stdout and stderr; Ray's output is in the run's log, which the report names."""
    (tmp_path / "data").symlink_to(scenes)
    command = train_command("data", "run", "--workers", "2", "--max-steps", "3", "--checkpoint-every", "2")
    env = {**os.environ, "M2F_PROGRESS_SECONDS": "1"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = (done.stdout + done.stderr).splitlines()
    assert lines and all(line.startswith("m2f train") for line in lines), lines
    assert "done at step 3" in done.stdout
    out = tmp_path / "run"
    latest = json.loads((out / "latest.json").read_text())
    assert latest["step"] == 3
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in metrics] == [1, 2, 3]
    assert all(x["loss"] > 0 for x in metrics)
    assert metrics[0]["lr"] == pytest.approx(1e-4)  # the head's --lr (the backbone's is 1e-5), no warm-up
    (report_path,) = (out / "_runs").glob("*.json")
    report = json.loads(report_path.read_text())
    assert (report["status"], report["exit_code"], report["step"]) == ("completed", 0, 3)
    assert report["config"]["data"] == str(tmp_path / "data")  # made absolute for the workers
    assert "TrainController" in Path(report["log"]).read_text()  # Ray's lines went to the log
    trained = m2f.load(str(out / "model.safetensors"))
    assert trained.config.class_names == tuple(c["name"] for c in SYNTHETIC_CATEGORIES)
    assert trained.config.task == "panoptic"
    with torch.no_grad():
        assert torch.isfinite(trained(torch.randn(1, 3, 64, 64)).mask_logits).all()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--arch", "nope"], "unknown --arch 'nope'"),
        (["--max-steps", "0"], "--max-steps must be >= 1"),
        (["--format", "semantic", "--annotations", "missing.json"], "not found:"),
    ],
)
def test_bad_arguments_exit_2_before_ray_starts_and_write_nothing(scenes, tmp_path, args, message):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["train", scenes, str(out), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not out.exists()


@pytest.mark.parametrize("case", ["panoptic_without_segments_info", "semantic_without_categories"])
def test_malformed_annotations_exit_2_naming_the_file(scenes, tmp_path, case):
    """Exit 2 is for the user's mistakes, raised where the input is read: annotations that lack what the
    dataset reader needs are bad input, not a bug."""
    panoptic = json.loads((Path(scenes) / "panoptic.json").read_text())
    if case == "panoptic_without_segments_info":
        del panoptic["annotations"][0]["segments_info"]
        args, message = ["--format", "coco-panoptic"], "a record lacks the field 'segments_info'"
    else:
        del panoptic["categories"]
        args, message = ["--format", "semantic"], "has no 'categories' list"
    annotations = tmp_path / "annotations.json"
    annotations.write_text(json.dumps(panoptic))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["train", scenes, str(out), *args, "--annotations", str(annotations)])
    assert result.exit_code == 2, result.output
    assert message in result.output and str(annotations) in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_a_bug_exits_3_with_its_traceback_in_the_run_log(scenes, tmp_path):
    """A KeyError that is no user's mistake is a bug: exit 3, one line, the traceback in the run's log. Here
    a real one: OUTPUT's latest.json, which only our checkpoints write, without its step."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "latest.json").write_text(json.dumps({"model": "checkpoints/step_0000001.safetensors"}))
    result = CliRunner().invoke(app, ["train", scenes, str(out), *FAST, "--max-steps", "1"])
    assert result.exit_code == 3, result.output
    assert "error: KeyError: 'step'" in result.output and "Traceback" not in result.output
    (report_path,) = (out / "_runs").glob("*.json")
    report = json.loads(report_path.read_text())
    assert report["status"] == "failed" and report["exit_code"] == 3 and report["error"] == "KeyError: 'step'"
    log = Path(report["log"]).read_text()
    assert "Traceback" in log and "KeyError: 'step'" in log and "training failed" in log


def test_sigterm_ends_training_with_143_a_report_and_no_ray_left(scenes, tmp_path):
    out = tmp_path / "run"
    command = train_command(scenes, str(out), "--max-steps", "500", "--checkpoint-every", "1")
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not (out / "latest.json").exists():
            assert time.time() < deadline and proc.poll() is None, "no checkpoint"
            time.sleep(0.2)
        ray_processes = descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    assert proc.returncode == 143, stdout + stderr
    deadline = time.time() + 15
    while [pid for pid in ray_processes if Path(f"/proc/{pid}").exists()]:
        assert time.time() < deadline, "Ray's processes outlived the run"
        time.sleep(0.2)
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("m2f train: cancelled by SIGTERM; last checkpoint: step "), stderr
    (report_path,) = (out / "_runs").glob("*.json")
    report = json.loads(report_path.read_text())
    assert (report["status"], report["exit_code"]) == ("cancelled", 143)
    assert report["step"] == json.loads((out / "latest.json").read_text())["step"] < 500


def test_killed_run_resumes_from_its_latest_checkpoint(scenes, tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "m2f.cli",
        "train",
        scenes,
        str(out),
        "--max-steps",
        "8",
        "--checkpoint-every",
        "2",
        *FAST,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        cmd,
        cwd=Path(__file__).parents[1],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            latest = out / "latest.json"
            if latest.exists() and json.loads(latest.read_text())["step"] >= 2:
                break
            assert proc.poll() is None, "training ended before it could be killed"
            time.sleep(0.2)
        else:
            pytest.fail("no checkpoint within 240 s")
    finally:
        kill_tree(proc)  # Ray's workers too: an orphaned worker could write one more checkpoint
    killed_at = json.loads((out / "latest.json").read_text())["step"]
    assert 2 <= killed_at < 8
    rerun = subprocess.run(cmd, cwd=Path(__file__).parents[1], env=env, capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"resuming from step {killed_at}" in rerun.stdout + rerun.stderr
    assert json.loads((out / "latest.json").read_text())["step"] == 8
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))  # the metrics file continues where the checkpoint left off
    assert len(list((out / "checkpoints").glob("*.safetensors"))) <= 3  # older ones pruned


def tiny_config(num_classes: int) -> ModelConfig:
    return ModelConfig(
        name="tiny3",
        backbone=ResNetConfig(depths=(1, 1, 1, 1), stem_channels=8, widths=(16, 32, 64, 128), norm="bn"),
        pixel_decoder=PixelDecoderConfig(conv_dim=32, mask_dim=32, num_layers=1, num_heads=4, ffn_dim=64, num_groups=8),
        decoder=DecoderConfig(hidden_dim=32, num_queries=8, num_heads=4, ffn_dim=64, num_layers=2),
        num_classes=num_classes,
        class_names=tuple(f"c{i}" for i in range(num_classes)),
        is_thing=(True,) * num_classes,
    )


def test_init_with_other_classes_resets_only_the_class_head(scenes, tmp_path):
    base = m2f.build_model(tiny_config(3))
    m2f.save(base, tmp_path / "base.safetensors")
    cfg = TrainConfig(data=scenes, output=str(tmp_path / "out"), init=str(tmp_path / "base.safetensors"))
    net, reset = build_for_training(cfg, list(SYNTHETIC_CATEGORIES))
    assert reset == ["transformer_decoder.class_embed.weight", "transformer_decoder.class_embed.bias"]
    assert net.config.num_classes == 5 and net.config.class_names[3] == "sky"
    own = base.state_dict()
    for key, value in net.state_dict().items():
        if key not in reset:
            assert torch.equal(value, own[key]), key


def test_schedule_and_parameter_groups():
    assert lr_factor(0, 100, 10) == pytest.approx(0.001)
    assert lr_factor(10, 100, 10) == pytest.approx((1 - 0.1) ** 0.9)
    assert lr_factor(100, 100, 0) == 0.0
    net = m2f.build_model(tiny_config(3))
    cfg = TrainConfig(data="x", output="y", lr=1e-4, backbone_lr_mult=0.1, weight_decay=0.05)
    groups = param_groups(net, cfg)
    by_id = {id(p): g for g in groups for p in g["params"]}
    named = dict(net.named_parameters())
    assert by_id[id(named["backbone.stem.conv.weight"])]["lr"] == pytest.approx(1e-5)
    assert by_id[id(named["transformer_decoder.class_embed.weight"])]["weight_decay"] == 0.05
    for no_decay in (
        "transformer_decoder.query_feat.weight",
        "pixel_decoder.level_embed",
        "transformer_decoder.decoder_norm.weight",
        "backbone.stem.norm.weight",
    ):
        assert by_id[id(named[no_decay])]["weight_decay"] == 0.0, no_decay
    assert sum(len(g["params"]) for g in groups) == len(named)
