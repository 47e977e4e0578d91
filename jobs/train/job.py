"""`m2f train`: fine-tune or train Mask2Former on Ray Train (TorchTrainer, DDP).

The parts: train/setup.py (data, model, optimiser groups, schedule), train/loop.py (what each
worker runs), train/checkpoints.py (what OUTPUT holds and how a run resumes). This module is the driver:
it checks the arguments before Ray starts (exit 2, nothing written), runs the trainer with Ray's own
output in the run's log, draws the progress from rank 0's reports, and ends every way a run can end with
one line, an exit code and a report under `OUTPUT/_runs/<run_id>.json`:

    0 done · 2 bad arguments or data · 3 training failed, or a bug (the cause in one line; the log has the
    traceback) ·
    130 / 143 cancelled by SIGINT / SIGTERM. After 3, 130 and 143 a re-run resumes from the last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import signal
import threading
from datetime import UTC, datetime
from typing import Any

from m2f.jobs.common.bad_input import BadInput, user_message
from m2f.jobs.common.cluster import ray_session
from m2f.jobs.common.configs import TrainConfig
from m2f.jobs.common.console import Console
from m2f.jobs.common.lifecycle import Cancelled, RunLog, Stop, handling_signals
from m2f.jobs.common.progress import Progress
from m2f.jobs.train.checkpoints import read_latest
from m2f.jobs.train.setup import open_dataset, total_steps
from m2f.pipeline.output import new_run_id, run_file
from m2f.pipeline.secrets import redact, scrub, secret_values
from m2f.pipeline.storage import open_fs, qualify, write_atomic

_ERROR_LINE = re.compile(r"^\s*([A-Za-z_][\w.]*(?:Error|Exception)): (.+)$")

log = logging.getLogger(__name__)


def run(cfg: TrainConfig) -> int:
    """Train; returns the exit code (see the module docstring)."""
    stop = Stop()
    with handling_signals(stop):
        return TrainRun(cfg.resolved(), stop).run()


class TrainRun:
    def __init__(self, cfg: TrainConfig, stop: Stop) -> None:
        self.cfg, self.stop = cfg, stop
        self.run_id = new_run_id()
        self.started = datetime.now(UTC)
        self.terminal = Console()
        self.secrets = secret_values(cfg.storage.user_options)
        self.log = RunLog(self.run_id)
        self.images = 0
        self.start_step = 0
        self.total = 0
        self.last: dict[str, Any] = {}

    def say(self, text: str, *, err: bool = False) -> None:
        self.terminal.line(scrub(text, self.secrets), err=err)

    def run(self) -> int:
        status, failure = "completed", ""
        try:
            try:
                self._check()
            except (ValueError, FileNotFoundError) as e:  # BadInput too; other storage errors and bugs: exit 3
                self.log.close()
                self.say(f"m2f train: error: {user_message(e)}", err=True)
                return 2
            self._train()
            if self.stop.requested:
                status = "cancelled"
        except Cancelled:
            status = "cancelled"
        except Exception as e:  # the trainer's error, a storage failure: one line here, the traceback in the log
            log.exception("training failed")
            status, failure = "failed", _cause(e)
        return self._finish(status, failure)

    # --- phases -----------------------------------------------------------------------------------

    def _check(self) -> None:
        """What can be checked before Ray starts: the options, the dataset, where to resume from."""
        cfg = self.cfg
        if cfg.max_steps is not None and cfg.max_steps < 1:
            raise BadInput("--max-steps must be >= 1")
        if cfg.epochs is not None and cfg.epochs <= 0:
            raise BadInput("--epochs must be > 0")
        from m2f.model.presets import ARCHITECTURES

        if not cfg.init and cfg.arch not in ARCHITECTURES:
            raise BadInput(f"unknown --arch {cfg.arch!r}; choose from {', '.join(sorted(ARCHITECTURES))}")
        dataset = open_dataset(cfg)  # a bad path or format fails here, in the driver
        self.images = len(dataset)
        if not self.images:
            raise BadInput(f"no training images under {cfg.data}")
        _, self.total = total_steps(cfg, self.images, cfg.workers)
        latest = read_latest(cfg)
        self.start_step = int(latest["step"]) if latest else 0
        resume = f", resuming from step {self.start_step}" if latest else ""
        self.say(
            f"m2f train {self.run_id}: {self.images} images ({cfg.format}), steps {self.start_step}-{self.total} "
            f"on {cfg.workers} worker(s){resume}"
        )

    def _train(self) -> None:
        cfg = self.cfg
        if self.start_step >= self.total:
            return
        self.stop.raise_now = False  # a signal inside ray.init() would leave a half-started Ray behind
        with self.terminal.capture_ray(self.log.path), ray_session(cfg.ray_address, self.stop):
            if self.stop.requested:
                raise Cancelled(self.stop.signum or signal.SIGTERM)
            import ray

            from m2f.jobs.train.loop import TrainProgress

            sink = ray.remote(num_cpus=0)(TrainProgress).remote()
            outcome: dict[str, BaseException] = {}
            fitting = threading.Thread(target=self._fit, args=(sink, outcome), name="m2f-train-fit", daemon=True)
            progress = Progress(
                self.total,
                initial=self.start_step,
                unit="steps",
                prefix="m2f train",
                stream=self.terminal.err,
            )
            try:
                fitting.start()
                while fitting.is_alive() and not self.stop.requested:
                    fitting.join(timeout=1.0)
                    self._show(ray.get(sink.take.remote(), timeout=30), progress)
                if not self.stop.requested:
                    self._show(ray.get(sink.take.remote(), timeout=30), progress)
            finally:
                progress.close()
            if "error" in outcome and not self.stop.requested:
                raise outcome["error"]

    def _fit(self, sink: Any, outcome: dict[str, BaseException]) -> None:
        import tempfile

        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        from m2f.jobs.train.loop import train_loop

        cfg = self.cfg
        try:
            TorchTrainer(
                train_loop,
                train_loop_config={**dataclasses.asdict(cfg), "progress": sink},
                scaling_config=ScalingConfig(
                    num_workers=cfg.workers,
                    use_gpu=cfg.use_gpu,
                    resources_per_worker={"CPU": cfg.threads_per_worker, **({"GPU": 1} if cfg.use_gpu else {})},
                ),
                run_config=RunConfig(storage_path=tempfile.mkdtemp(prefix="m2f-train-"), name="m2f-train"),
            ).fit()
        except BaseException as e:  # handed to the main thread, which owns the ending
            outcome["error"] = e

    def _show(self, state: dict[str, Any], progress: Progress) -> None:
        for note in state.get("notes", []):
            self.say(f"m2f train: {note}", err=True)
        if state.get("step") is not None:
            self.last = state
            progress.update(max(0, state["step"] - progress.done))
            progress.set_note(f"loss {state['loss']:.4f}, lr {state['lr']:.2e}")
        if progress.done < progress.total:  # after the last step only Ray Train's shutdown is left
            progress.tick()

    # --- the end ----------------------------------------------------------------------------------

    def _finish(self, status: str, failure: str) -> int:
        cfg = self.cfg
        checkpoint = _quietly(lambda: _checkpoint_step(cfg))  # None: no checkpoint, or none readable
        step = checkpoint or 0
        exit_code = {"completed": 0, "failed": 3}.get(status, self.stop.exit_code or 130)
        report = _quietly(lambda: self._write_report(status, exit_code, step, failure))
        where = f"; report: {report}" if report else f"; log: {self.log.path}"
        out = cfg.output.rstrip("/")
        if status == "completed":
            loss = f", loss {self.last['loss']:.4f}" if self.last.get("loss") is not None else ""
            self.say(f"m2f train: done at step {step}{loss}; model: {out}/model.safetensors{where}")
        else:
            what = (
                f"cancelled by {self.stop.signal_name() or 'a signal'}"
                if status == "cancelled"
                else f"error: {failure}"
            )
            kept = f"last checkpoint: step {step}" if checkpoint is not None else "no checkpoint yet"
            self.say(f"m2f train: {what}; {kept}; a re-run resumes{where}", err=True)
        return exit_code

    def _write_report(self, status: str, exit_code: int, step: int, failure: str) -> str:
        """`_runs/<run_id>.json` and the log beside it; returns the report's URI."""
        cfg = self.cfg
        fs, root = open_fs(cfg.output, cfg.options(cfg.output))
        log_path = run_file(root, self.run_id, ".log")
        report = {
            "run_id": self.run_id,
            "command": "train",
            "status": status,
            "exit_code": exit_code,
            "error": failure or None,
            "config": redact({k: v for k, v in dataclasses.asdict(cfg).items() if k != "storage_options_json"}),
            "images": self.images,
            "start_step": self.start_step,
            "step": step,
            "total_steps": self.total,
            "last": {k: v for k, v in self.last.items() if k != "notes"},
            "started": self.started.isoformat(),
            "finished": datetime.now(UTC).isoformat(),
            "log": qualify(fs, log_path),
        }
        write_atomic(fs, log_path, scrub(self.log.text(), self.secrets))
        self.log.close()
        path = run_file(root, self.run_id, ".json")
        write_atomic(fs, path, scrub(json.dumps(report, indent=2), self.secrets) + "\n")
        return qualify(fs, path)


def _cause(e: BaseException) -> str:
    """The one line that says why training failed: the worker's own exception when Ray wraps it (Ray's
    message is a traceback with the error as its last line), else the exception itself."""
    text = str(e)
    for line in reversed(text.splitlines()):
        found = _ERROR_LINE.match(line)
        if found:
            return f"{found.group(1).rsplit('.', 1)[-1]}: {found.group(2).strip()}"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _checkpoint_step(cfg: TrainConfig) -> int | None:
    """The step of OUTPUT's latest checkpoint; None without one."""
    latest = read_latest(cfg)
    return int(latest["step"]) if latest else None


def _quietly(fn: Any) -> Any:
    try:
        return fn()
    except Exception:
        log.exception("after training")
        return None
