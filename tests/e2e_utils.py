"""Helpers for the end-to-end test (test_pipeline_dvc.py): a throw-away project repository, subprocesses with
the pipeline's environment, a local MLflow UI server and a headless Chromium to look at it."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
# What a user's checkout holds that the pipeline, `mlflow run` and the notebooks read.
PROJECT_FILES = ("dvc.yaml", "MLproject", "python_env.yaml", ".gitignore")
PROJECT_DIRS = ("src", "notebooks", "offline_plots")
CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def pipeline_env(repo: Path) -> dict[str, str]:
    """The environment `make repro` gives DVC: the venv's bin first (DVC stages call `brainlatent`), the project
    root, no analytics, git identity for commits, and no MLFLOW_TRACKING_URI (the project's own SQLite store)."""
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "DVC_NO_ANALYTICS": "1",
        "BRAINLATENT_ROOT": str(repo),
        "MPLBACKEND": "Agg",
        "GIT_PYTHON_REFRESH": "quiet",
        "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org",
        "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.org",
        # Stages run one after another on a small CI machine: one thread each avoids oversubscription.
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("MLFLOW_RUN_ID", None)
    return env


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess:
    """Run ``cmd``; fail the test with the tail of its output when it exits non-zero."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"`{' '.join(map(str, cmd))}` exited {proc.returncode}:\n--- stdout\n{proc.stdout[-4000:]}\n"
        f"--- stderr\n{proc.stderr[-6000:]}"
    )
    return proc


def make_project(dest: Path, params: dict) -> tuple[Path, dict[str, str]]:
    """A fresh git + DVC repository at ``dest`` holding this checkout's pipeline files and ``params``."""
    dest.mkdir(parents=True)
    for name in PROJECT_FILES:
        shutil.copy(REPO / name, dest / name)
    for name in PROJECT_DIRS:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, dest / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", ".ipynb_checkpoints"))
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = pipeline_env(dest)
    run(["git", "init", "-q"], dest, env)
    run([sys.executable, "-m", "dvc", "init", "-q"], dest, env)
    shutil.copy(REPO / ".dvc" / "config", dest / ".dvc" / "config")  # the project's DVC settings (offline plots)
    run(["git", "add", "-A"], dest, env)
    run(["git", "commit", "-qm", "init"], dest, env)
    return dest, env


def dvc(args: list[str], repo: Path, env: dict[str, str], timeout: float = 900) -> str:
    return run([sys.executable, "-m", "dvc", *args], repo, env, timeout).stdout


# --------------------------------------------------------------------------------------- UI server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Poll ``url`` until HTTP 200; fail early with the server's log if it exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"UI server exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout:.0f} s")


def stop_process_group(proc: subprocess.Popen) -> None:
    """Stop a server started with ``start_new_session=True`` and every worker it forked (its own group)."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


# ----------------------------------------------------------------------------------------- browser
def apt_install(package: str) -> str:
    """Install Debian's ``package`` with apt-get (root only, as on CI). Returns "" on success, else why not."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("apt-get"):
        return f"installing {package} needs apt-get as root"
    apt_env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # `make test` runs two pytest workers (pytest-xdist): both may want a package at once, and apt-get refuses
    # to run beside itself (dpkg lock). One installs while the other waits, then finds the package there.
    with open(Path(tempfile.gettempdir()) / "brainlatent-tests-apt.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _apt_get(package, apt_env)


def _apt_get(package: str, apt_env: dict[str, str]) -> str:
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "--no-install-recommends", package]):
        try:
            proc = subprocess.run(cmd, env=apt_env, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as err:
            return f"`{' '.join(cmd)}` failed: {err}"
        if proc.returncode != 0:
            return f"`{' '.join(cmd)}` exited {proc.returncode}: {proc.stderr.strip()[-500:]}"
    return ""


def find_or_install_chromium() -> tuple[str | None, str]:
    """A headless-capable Chromium: on PATH, else Debian's package installed with apt-get when running as root.
    Returns (path or None, why not)."""
    for name in CHROMIUM_CANDIDATES:
        path = shutil.which(name)
        if path:
            return path, ""
    why = apt_install("chromium")
    if why:
        return None, f"no chromium on PATH, and {why}"
    path = shutil.which("chromium")
    return (path, "") if path else (None, "apt-get installed chromium but it is not on PATH")


def chromium_cmd(chromium: str, profile: Path, budget_ms: int = 15000, window: str = "1400,900") -> list[str]:
    """Headless flags that keep Chromium offline (no sync, updates, field trials) and reproducible. A taller
    ``window`` ("width,height") lets pages that render lazily (MLflow's chart view) draw more at once."""
    return [
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-extensions", "--hide-scrollbars", f"--user-data-dir={profile}", f"--window-size={window}",
        f"--virtual-time-budget={budget_ms}",
    ]


def render_dom(chromium: str, url: str, profile: Path, budget_ms: int = 15000, window: str = "1400,900") -> str:
    """The DOM after the page's scripts ran (``--dump-dom``)."""
    proc = subprocess.run([*chromium_cmd(chromium, profile, budget_ms, window), "--dump-dom", url],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"chromium --dump-dom {url} exited {proc.returncode}: {proc.stderr[-3000:]}"
    return proc.stdout


def screenshot(chromium: str, url: str, png: Path, profile: Path, budget_ms: int = 15000,
               window: str = "1400,900") -> Path:
    proc = subprocess.run([*chromium_cmd(chromium, profile, budget_ms, window), f"--screenshot={png}", url],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0 and png.is_file(), (
        f"chromium --screenshot {url} exited {proc.returncode}: {proc.stderr[-3000:]}"
    )
    return png


# Chromium with the network cut: no host name resolves and every non-file request goes to a closed local port.
# A page that needs a CDN (DVC's default plots page) then draws nothing, as on an offline cluster.
OFFLINE_FLAGS = ("--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9")


def render_offline(chromium: str, url: str, png: Path, profile: Path, budget_ms: int = 15000) -> str:
    """Open ``url`` in headless Chromium with the network unreachable: screenshot to ``png``; returns the DOM."""
    base = [*chromium_cmd(chromium, profile, budget_ms), *OFFLINE_FLAGS]
    dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=180)
    assert dom.returncode == 0, f"chromium --dump-dom {url} exited {dom.returncode}: {dom.stderr[-3000:]}"
    shot = subprocess.run([*base, f"--screenshot={png}", url], capture_output=True, text=True, timeout=180)
    assert shot.returncode == 0 and png.is_file(), (
        f"chromium --screenshot {url} exited {shot.returncode}: {shot.stderr[-3000:]}"
    )
    return dom.stdout


def assert_one_error_line(proc: subprocess.CompletedProcess, what: str, expected: str) -> None:
    """``proc`` (a `brainlatent` command) failed as a user mistake: exit 2, no traceback, and one `error: ...`
    line holding ``expected`` as the last thing it printed."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, f"{what}: exit {proc.returncode}, expected 2\n{out[-3000:]}"
    assert "Traceback" not in out, f"{what} printed a traceback:\n{out[-3000:]}"
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], f"{what}: expected one `error: ...{expected}...` line:\n{out}"
    assert proc.stderr.rstrip().endswith(errors[0]), f"{what}: the error line is not the last word:\n{out}"
