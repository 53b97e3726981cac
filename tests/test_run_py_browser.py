"""The app started the way users start it — ``python3 run.py`` in its own fresh process — and a tiny FLUX.1 dev
LoRA trained from a diffusers folder through the page in Chromium.

tests/test_ui_browser.py drives the same page, but launches the app inside the pytest process, where torch,
diffusers and transformers were imported long ago by other tests.  Here nothing is shared with this process:
run.py checks the environment (the install stamp matches, so nothing is installed), re-executes itself with
the venv's interpreter and serves the app from ``config.json``; the first import of every library happens in
that process, as on a user's machine.

The project folder is a temporary one: copies of run.py and packages.jsonc (run.py takes its folder as the
project root), symlinks to core/, architectures/, ui/, training.json and the real .venv (``running_in`` compares
resolved paths; the stamp key depends only on packages.jsonc's text, the torch choice and the Python version),
and a config.json with a free port and absolute models/datasets/outputs/presets folders.

Chromium: /usr/bin/chromium (``apt-get install chromium``); missing, the test is skipped, except in CI.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

import architectures
from tests.test_fresh_process import _file_problems
from tests.test_ui_browser import (_require_chromium, _wait_for_final, browser_page, check, choose, choose_dropdown,
                                   expect_text, fill, open_advanced, open_tab)
from tests.tiny_models import build_tiny_dataset
from tests.tiny_models_dit import build_tiny_dit

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 120
LINKED = ("core", "architectures", "ui", "training.json", ".venv")
# what ensure_environment prints as soon as it decides to install anything
INSTALLING = ("LoRA Studio: preparing", "[1/3] Hardware", "Creating the virtual environment")
pytestmark = pytest.mark.timeout(900)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _outside_python() -> str:
    """The interpreter a user types ``python3`` for: the one the venv was made from, not the venv's own (run.py
    must find the venv and re-execute itself in it)."""
    base = getattr(sys, "_base_executable", None)
    if base and Path(base).exists() and Path(base).resolve() != Path(sys.executable).resolve():
        return base
    return shutil.which("python3") or sys.executable


def _stamp_matches(venv: Path) -> tuple[bool, str]:
    """Whether run.py will find the venv ready (the same check ``ensure_environment`` makes before installing)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("run_py_under_test", ROOT / "run.py")
    run = sys.modules[spec.name] = importlib.util.module_from_spec(spec)   # (its dataclasses look themselves up)
    spec.loader.exec_module(run)
    spec_text = (ROOT / "packages.jsonc").read_text(encoding="utf-8")
    choice = run.choose_torch(run.load_spec(ROOT / "packages.jsonc")["torch"], run.detect_nvidia())
    key = run.environment_key(spec_text, choice, run.venv_python_version(venv))
    stamp = run.read_stamp(venv)
    ok = stamp.get("key") == key and "app" in stamp.get("groups", [])
    return ok, f"stamp {json.dumps(stamp)} vs expected key {key} with group 'app'"


def _log_tail(log: Path, n: int = 60) -> str:
    try:
        return "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _stop(proc: subprocess.Popen) -> None:
    """Ends the app and anything it started (its own process group, from ``start_new_session``)."""
    for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 30)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    _require_chromium()
    venv = ROOT / ".venv"
    ready, why = _stamp_matches(venv)
    if not ready:
        pytest.fail(f"run.py would install packages into {venv} before starting (its install stamp does not match); "
                    f"run `python3 run.py` or `python3 -m tests` once first. {why}")

    project = tmp_path_factory.mktemp("run_py")
    for name in ("run.py", "packages.jsonc"):
        shutil.copy(ROOT / name, project / name)
    for name in LINKED:
        (project / name).symlink_to(ROOT / name)
    dirs = {name: project / name for name in ("models", "datasets", "outputs", "presets")}
    for d in dirs.values():
        d.mkdir()
    build_tiny_dit("flux1_dev", dirs["models"] / "tiny-flux1-dev", "diffusers")
    build_tiny_dataset(dirs["datasets"] / "shapes", n=4)
    port = _free_port()
    (project / "config.json").write_text(json.dumps({
        "host": "127.0.0.1", "port": port, "models_dir": str(dirs["models"]), "datasets_dir": str(dirs["datasets"]),
        "outputs_dir": str(dirs["outputs"]), "presets_dir": str(dirs["presets"]),
        "training_defaults": str(project / "training.json")}, indent=2), encoding="utf-8")

    log = project / "run.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([_outside_python(), "run.py"], cwd=str(project), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        deadline = time.time() + START_TIMEOUT_S
        while True:
            text = log.read_text(encoding="utf-8", errors="replace")
            if any(marker in text for marker in INSTALLING):
                pytest.fail(f"run.py started installing instead of starting the app:\n{_log_tail(log)}")
            if proc.poll() is not None:
                pytest.fail(f"run.py exited with {proc.returncode} before serving the app:\n{_log_tail(log)}")
            try:
                with no_proxy.open(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.time() > deadline:
                pytest.fail(f"nothing answered on {url} after {START_TIMEOUT_S} s:\n{_log_tail(log)}")
            time.sleep(0.5)
        cmdline = Path(f"/proc/{proc.pid}/cmdline")
        if cmdline.exists():   # Linux: run.py replaced itself with the venv's interpreter (os.execv, same pid)
            argv = cmdline.read_bytes().split(b"\0")
            assert argv[0].decode() == str(project / ".venv" / "bin" / "python"), argv
        yield {"url": url, "proc": proc, "log": log, "project": project, **dirs}
    finally:
        _stop(proc)
        for name in LINKED:       # the links go; what they point to stays
            (project / name).unlink()


@pytest.fixture(scope="module")
def page(app):
    with browser_page(app["url"]) as pg:
        yield pg


def test_run_py_serves_the_app_and_trains_flux1_from_a_diffusers_folder(app, page):
    log_start = app["log"].read_text(encoding="utf-8", errors="replace")
    assert not any(marker in log_start for marker in INSTALLING), log_start

    # Dataset: a folder name inside the configured datasets folder; tiny_train_settings' resolution and buckets
    open_tab(page, "Dataset")
    fill(page, "dataset.path", "shapes")
    fill(page, "dataset.resolution", 64)
    check(page, "dataset.enable_buckets", True)
    open_advanced(page, "dataset")
    fill(page, "dataset.min_bucket_reso", 32)
    fill(page, "dataset.max_bucket_reso", 128)
    fill(page, "dataset.bucket_reso_steps", 32)

    # Model: FLUX.1 dev from the diffusers folder listed from the models folder; a short T5 text for the tiny T5
    open_tab(page, "Model")
    choose(page, "model.architecture", "flux1_dev")
    choose_dropdown(page, "model.model_path", "tiny-flux1-dev")
    open_advanced(page, "model")
    fill(page, "model.t5_max_length", 24)

    open_tab(page, "Network")
    fill(page, "network.rank", 4)
    fill(page, "network.alpha", 2)

    # a learning rate large enough that every trained tensor clearly moves in 4 steps
    open_tab(page, "Optimizer")
    fill(page, "optimizer.learning_rate", 0.01)
    fill(page, "schedule.max_train_steps", 4)
    fill(page, "schedule.train_batch_size", 1)
    open_advanced(page, "optimizer")
    fill(page, "schedule.log_every_n_steps", 1)

    open_tab(page, "Saving & previews")
    fill(page, "saving.output_name", "run_py_flux")
    fill(page, "saving.save_every_n_epochs", 0)
    check(page, "saving.save_state", True)
    fill(page, "sampling.sample_every_n_steps", 0)

    # Run: one CPU thread (the box runs other tests), then Start
    open_tab(page, "Run")
    open_advanced(page, "run")
    fill(page, "memory.cpu_threads", 1)
    plan = page.locator("#run-plan")
    expect_text(plan, "RAM estimate ≈", timeout_s=60)
    page.locator("#run-start").click()
    final = _wait_for_final(page)        # "Final adapter: …" with "Step 4 / 4", or the failure with its log
    assert "Finished" in page.locator("#run-status").inner_text()
    assert final.is_file() and final.parent.parent == app["outputs"], final

    # every file the run saved (the final adapter and the state's), read here: finite, every up matrix trained away
    # from its zero init, every down matrix initialised, FLUX.1 dev's metadata
    files = sorted(final.parent.rglob("*.safetensors"))
    assert final in files and any(p.name == "adapter.safetensors" for p in files), files
    arch = architectures.get("flux1_dev")
    problems = [f"{p.relative_to(final.parent)}: {problem}" for p in files
                for problem in _file_problems("flux1_dev", arch, p, metadata=p.name != "adapter.safetensors")]
    assert not problems, "\n".join(problems)
    with safe_open(str(final), "pt") as f:       # what was typed into the page reached the run
        md = f.metadata()
    assert (md["ss_network_dim"], md["ss_network_alpha"], md["ss_steps"], md["ss_learning_rate"],
            md["ss_resolution"]) == ("4", "2.0", "4", "0.01", "(64, 64)"), md
    stems = {k.split(".")[0] for k in load_file(str(final))}
    assert len(stems) > 10 and all(k.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_"))
                                   for k in stems), sorted(stems)[:5]
    # the same process kept serving: nothing was installed, and the venv's interpreter ran the app
    assert app["proc"].poll() is None
    log = app["log"].read_text(encoding="utf-8", errors="replace")
    assert not any(marker in log for marker in INSTALLING), _log_tail(app["log"])
