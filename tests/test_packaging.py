"""What `pip install` puts on a user's path: one package, `m2f`, holding every module of the repository,
which a user's own `model.py` or `jobs/` (first on the path under `ray job submit --working-dir .`) cannot
shadow."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SOURCE_FOLDERS = ("model", "pipeline", "jobs")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built from a clean copy of the source: setuptools' build/ folder in a checkout keeps files from
    earlier builds, which would hide a package missing from pyproject's list."""
    source, out = tmp_path_factory.mktemp("source") / "m2f", tmp_path_factory.mktemp("wheel")
    litter = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*cache", "out")
    shutil.copytree(REPO, source, ignore=litter)
    command = [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q", "-w"]
    subprocess.run([*command, str(out)], check=True, capture_output=True, timeout=300)
    (built,) = out.glob("m2f-*.whl")
    return built


def test_the_wheel_holds_one_package_with_every_module(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"m2f", wheel.name.split("-py3")[0] + ".dist-info"}
    files = [path for folder in SOURCE_FOLDERS for path in (REPO / folder).rglob("*.py")]
    sources = {"m2f/cli.py"} | {f"m2f/{path.relative_to(REPO).as_posix()}" for path in files}
    assert sources - set(names) == set()  # a subpackage left out of pyproject's list would be missing here
    assert "m2f/model/assets/demo.safetensors" in names


def test_the_installed_package_runs_beside_a_users_own_model_and_jobs(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # what pip does with a pure-Python wheel
    project = tmp_path / "project"  # a user's ML project, the current folder of the run
    (project / "jobs").mkdir(parents=True)
    for module in (project / "model.py", project / "pipeline.py", project / "jobs" / "__init__.py"):
        module.write_text("raise ImportError('the user\\'s own module was imported')\n")
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run(
        [sys.executable, "-c", "import m2f.cli, m2f.jobs.segment.job as s; print(s.__file__)"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert where.stdout.strip().startswith(str(site))  # the wheel's m2f, not the checkout's
    command = [sys.executable, "-m", "m2f.cli", "segment", str(REPO / "samples"), "out"]
    done = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "images ok" in done.stdout and list((project / "out").glob("part-*.parquet"))
