"""Safe on a shared box: config.json's login is validated and a share link never opens without one; files are
written with the user's umask; a run never changes another run's files."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request

import pytest
import torch

import core
from PIL import Image

from core.config import AppConfig, load_config
from core.io import atomic_save_image, atomic_save_safetensors, atomic_torch_save, atomic_write_json
from ui import warmup
from tests.test_run_guards import run, settings_for, tiny  # noqa: F401 - the tiny SD1.5 fixture and its runner


@pytest.mark.parametrize("auth,pairs", [(None, None), (["u", "pw"], [("u", "pw")]),
                                        ([["a", "1"], ["b", "2"]], [("a", "1"), ("b", "2")])])
def test_auth_shapes_people_write(auth, pairs):
    assert AppConfig(auth=auth).auth == pairs


@pytest.mark.parametrize("auth", [["u"], [], ["u", ""], [["a", "1"], ["b"]], "u:pw", [["", "pw"]]])
def test_bad_auth_names_the_setting_and_the_shape(auth):
    with pytest.raises(ValueError, match=r"auth.*\[\"user\", \"password\"\]"):
        AppConfig(auth=auth)


def test_a_share_link_without_login_refuses_to_start(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"share": True, "auth": None}))
    with pytest.raises(ValueError, match=r'"share": true opens a public link.*set a login first'):
        load_config(path)
    path.write_text(json.dumps({"share": True, "auth": ["me", "secret"]}))
    assert load_config(path).auth == [("me", "secret")]


def test_the_page_asks_for_the_login(tmp_path):
    from ui.app import launch
    folders = {k: str(tmp_path / k) for k in ("models_dir", "datasets_dir", "outputs_dir", "presets_dir")}
    demo = launch(AppConfig(port=0, auth=[["alice", "pw1"], ["bob", "pw2"]], **folders), prevent_thread_lock=True,
                  quiet=True)
    try:
        url = demo.local_url
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url + "config", timeout=30)
        assert e.value.code == 401

        def login(user, password):
            data = urllib.parse.urlencode({"username": user, "password": password}).encode()
            return urllib.request.urlopen(url + "login", data, timeout=30)
        with pytest.raises(urllib.error.HTTPError):
            login("alice", "wrong")
        assert login("bob", "pw2").status == 200
    finally:
        demo.close()
        warmup.wait()  # the app's warm-up thread imports diffusers: later tests import it too


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640)])
def test_saved_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        paths = [atomic_save_safetensors(tmp_path / "a.safetensors", {"w": torch.ones(2)}),
                 atomic_save_image(tmp_path / "p.png", Image.new("RGB", (4, 4))),
                 atomic_write_json(tmp_path / "s.json", {"x": 1}),
                 atomic_torch_save(tmp_path / "o.pt", {"x": torch.ones(1)})]
    finally:
        os.umask(old)
    assert {oct(p.stat().st_mode & 0o777) for p in paths} == {oct(mode)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "o.pt", "p.png", "s.json"]


# -- runs never change another run's files ---------------------------------------------------------------

def snapshot(folder):
    return {p.relative_to(folder): (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*") if p.is_file()}


def test_a_rerun_with_the_same_name_writes_only_fresh_names(tiny, tmp_path):
    out = tmp_path / "outputs" / "same"
    first, _ = run(tiny, tmp_path, saving__output_name="same", saving__save_every_n_steps=2,
                   sampling__sample_every_n_steps=2, sampling__prompts="a red square")
    assert first.final.name == "same.safetensors" and first.state_dir.name == "same-state-000004"
    before = snapshot(out)
    second, _ = run(tiny, tmp_path, saving__output_name="same", saving__save_every_n_steps=2,
                    sampling__sample_every_n_steps=2, sampling__prompts="a red square")
    assert second.final.name == "same-1.safetensors" and second.state_dir.name == "same-1-state-000004"
    after = snapshot(out)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing of the first run changed
    new = sorted(str(k) for k in set(after) - set(before))
    assert new and all(n.startswith(("same-1", "samples/same-1-", "logs/same-1-")) for n in new), new


def test_a_resumed_run_keeps_the_final_file_and_prunes_only_its_own_saves(tiny, tmp_path):
    out = tmp_path / "outputs" / "res"
    common = dict(saving__output_name="res", saving__save_every_n_steps=1, saving__save_last_n=2)
    first, _ = run(tiny, tmp_path, schedule__max_train_steps=4, **common)
    other, _ = run(tiny, tmp_path, schedule__max_train_steps=2, **common)  # another run, same name: res-1
    final_before = first.final.read_bytes()
    other_files = {k: v for k, v in snapshot(out).items() if str(k).startswith("res-1")}
    resumed, events = run(tiny, tmp_path, schedule__max_train_steps=7, saving__resume_from=str(first.state_dir),
                          **common)
    assert not isinstance(resumed, Exception), resumed
    assert first.final.read_bytes() == final_before
    assert resumed.final.name == "res-step000007.safetensors"
    mine = sorted(p.name for p in out.iterdir() if p.name.startswith("res-s"))
    # keep-last-2 counted across the resume: the first run's step 2/3 files and states 3/4/5 are gone
    assert mine == ["res-state-000006", "res-state-000007", "res-step000005.safetensors",
                    "res-step000006.safetensors", "res-step000007.safetensors"], mine
    assert {k: v for k, v in snapshot(out).items() if str(k).startswith("res-1")} == other_files


def test_a_step_is_saved_once_when_two_rules_ask(tiny, tmp_path):
    result, events = run(tiny, tmp_path, schedule__max_train_steps=14, saving__save_every_n_steps=7,
                         saving__save_every_n_epochs=1)  # 7 images, batch 1: epoch ends at steps 7 and 14
    saves = [(e["step"], e["kind"]) for e in events if e["type"] == "saved"]
    assert saves.count((7, "adapter")) == 1 and saves.count((7, "state")) == 1
    assert saves.count((14, "state")) == 1


# -- a disk that refuses a save ----------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MB tmpfs (the test runs as root, as CI does); skipped where mounting is not allowed."""
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder, leave_bytes):
    """A filler file that leaves about ``leave_bytes`` free on ``folder``'s filesystem."""
    free = shutil.disk_usage(folder).free
    path = folder / "filler.bin"
    with open(path, "ab") as f:
        f.write(b"\0" * max(0, free - leave_bytes))
    return path


def disk_run(tiny, tmp_path, disk, on_event=None, **overrides):
    s, _ = settings_for(tiny, tmp_path, saving__output_name="disk", saving__save_every_n_steps=2,
                        schedule__max_train_steps=6, **overrides)
    config = AppConfig(outputs_dir=str(disk), models_dir=str(tmp_path), datasets_dir=str(tmp_path),
                       allowed_roots=[str(tiny["data"].parent)])
    events = []

    def on(e):
        events.append(e)
        if on_event is not None:
            on_event(e)
    try:
        return core.train(s, on_event=on, config=config), events
    except Exception as exc:  # noqa: BLE001 - asserted by the caller
        return exc, events


def test_disk_full_before_a_save_stops_with_the_numbers_and_keeps_the_last_state(tiny, tmp_path, small_disk):
    filler = []
    # after the first save (step 2), leave too little room for the next one
    result, events = disk_run(tiny, tmp_path, small_disk, on_event=lambda e: filler.append(fill(small_disk, 100_000))
                              if e["type"] == "saved" and e["kind"] == "state" and not filler else None)
    assert isinstance(result, core.SaveFailed), result
    message = str(result)
    assert message.startswith(f"No space left on {small_disk / 'disk'} while saving the adapter and the resumable "
                              "state at step 4 (needs ≈")
    assert " MB free). Training stopped; the last good state is " in message and "free space and press Resume" in message
    state = small_disk / "disk" / "disk-state-000002"
    assert str(state) in message
    names = sorted(p.name for p in (small_disk / "disk").iterdir())
    # nothing partial left behind (logs/: the run's TensorBoard logs, dropped with a warning once the disk is full)
    assert names == ["disk-state-000002", "disk-step000002.safetensors", "logs"], names
    # space freed: Resume goes on from the named state to the end
    filler[0].unlink()
    resumed, _ = disk_run(tiny, tmp_path, small_disk, saving__resume_from=str(state))
    assert not isinstance(resumed, Exception), resumed
    assert resumed.steps == 6 and resumed.final.name == "disk.safetensors"


def test_disk_full_while_writing_removes_the_partial_state(tiny, tmp_path, small_disk):
    filler = []
    # the adapter of step 2 is written; the disk fills up before its state is
    result, events = disk_run(tiny, tmp_path, small_disk, on_event=lambda e: filler.append(fill(small_disk, 20_000))
                              if e["type"] == "saved" and e["kind"] == "adapter" and not filler else None)
    assert isinstance(result, core.SaveFailed), result
    assert "No space left on" in str(result) and "no resumable state was saved before" in str(result)
    names = sorted(p.name for p in (small_disk / "disk").iterdir())
    assert names == ["disk-step000002.safetensors", "logs"], names  # the state's hidden folder is gone


def test_a_read_only_output_folder_is_named(tiny, tmp_path, small_disk):
    def remount(e):
        if e["type"] == "saved" and e["kind"] == "state":
            subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    result, events = disk_run(tiny, tmp_path, small_disk, on_event=remount)
    assert isinstance(result, core.SaveFailed), result      # the logs, unwritable too, do not hide it
    assert f"{small_disk / 'disk'} is read-only while saving the adapter" in str(result)
    assert "make it writable and press Resume" in str(result)


# -- the web server serves only what the app produced for display -------------------------------------------

def test_the_server_serves_the_files_shown_and_nothing_beside_them(tiny, tmp_path):
    from ui.app import _poll_updates, launch
    folders = {k: tmp_path / k for k in ("models_dir", "datasets_dir", "outputs_dir", "presets_dir")}
    config = AppConfig(port=0, allowed_roots=[str(tiny["data"].parent)], **{k: str(v) for k, v in folders.items()})
    demo = launch(config, prevent_thread_lock=True, quiet=True)
    try:
        warmup.wait()
        s, _ = settings_for(tiny, tmp_path, saving__output_name="shown", sampling__sample_every_n_steps=2,
                            sampling__prompts="a red square")
        out = folders["outputs_dir"] / "shown"
        out.mkdir(parents=True)
        (out / "secret.txt").write_text("not for the web")
        controller = demo.studio_controller
        assert controller.start(s)[0] and controller.wait(300)
        snap = controller.state.snapshot()
        assert snap.final and snap.samples, snap.status
        _poll_updates(demo, snap, {})  # what the page's timer does: the preview and the final file get shown

        def status(path):
            try:
                return urllib.request.urlopen(f"{demo.local_url}gradio_api/file={path}", timeout=30).status
            except urllib.error.HTTPError as e:
                return e.code
        assert status(snap.final) == 200 and status(snap.samples[0][0]) == 200
        state = next(out.glob("shown-state-*"))
        for private in [out / "secret.txt", state / "optimizer.pt", state / "adapter.safetensors",
                        folders["models_dir"], tmp_path / "data" / "img_000.png"]:
            assert status(private) in (403, 404), private
    finally:
        demo.close()


# -- every user-given path stays inside the app's folders -------------------------------------------------

def app_folders(tmp_path, **extra):
    folders = {k: tmp_path / k for k in ("models_dir", "datasets_dir", "outputs_dir", "presets_dir")}
    for f in folders.values():
        f.mkdir(parents=True, exist_ok=True)
    return AppConfig(**{k: str(v) for k, v in folders.items()}, **extra), folders


def test_paths_resolve_inside_the_folders_or_are_refused(tmp_path):
    from core.config import PathNotAllowed
    config, f = app_folders(tmp_path)
    (f["datasets_dir"] / "cats").mkdir()
    assert config.resolve("cats", "datasets_dir", "dataset.path") == (f["datasets_dir"] / "cats").resolve()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (f["datasets_dir"] / "link").symlink_to(outside)
    for value in ["/etc", "../elsewhere", "cats/../../elsewhere", "link", str(outside)]:
        with pytest.raises(PathNotAllowed, match=r"^dataset\.path: .* is outside the folders this app may use \(.*"
                                                 r"datasets_dir.*allowed_roots"):
            config.resolve(value, "datasets_dir", "dataset.path")
    widened, _ = app_folders(tmp_path, allowed_roots=[str(outside)])
    assert widened.resolve("link", "datasets_dir", "dataset.path") == outside.resolve()


@pytest.mark.parametrize("field,value", [("dataset__path", "/etc"), ("saving__output_dir", "EVIL"),
                                         ("saving__resume_from", "/etc"), ("dataset__reg_path", "../../..")])
def test_a_run_refuses_paths_outside_before_touching_anything(tiny, tmp_path, field, value):
    value = str(tmp_path / "evil") if value == "EVIL" else value  # beside the app's folders, not inside
    s, _ = settings_for(tiny, tmp_path, **{field: value})
    config, f = app_folders(tmp_path, allowed_roots=[str(tiny["data"].parent)])
    events = []
    with pytest.raises(core.SettingsError, match=rf"^{field.replace('__', '.')}: .* is outside the folders"):
        core.train(s, on_event=events.append, config=config)
    assert not any(e["type"] == "status" for e in events)  # not even the dataset was read
    assert not (tmp_path / "evil").exists() and not any(f["outputs_dir"].iterdir())


def test_tools_refuse_paths_outside(tmp_path):
    from ui import tools_tab
    config, f = app_folders(tmp_path)
    roots = config.roots()
    text = tools_tab.resize_handler("/etc/passwd", "out.safetensors", "fixed", "4", dirs=[f["outputs_dir"]],
                                    roots=roots)
    assert text.startswith("✗ Error: Adapter file: /etc/passwd is outside the folders")
    text = tools_tab.summary_handler("../../x.safetensors", dirs=[f["outputs_dir"]], roots=roots)
    assert "is outside the folders" in text


def test_the_plan_says_when_the_model_path_is_outside(tmp_path):
    from ui.app import plan_markdown
    config, _ = app_folders(tmp_path)
    s = core.load_settings()
    s.model.model_path = "/etc"
    assert "model.model_path: /etc is outside the folders" in plan_markdown(s, config)


# -- several tabs share one run ----------------------------------------------------------------------------

def test_a_refused_start_names_the_running_run_and_keeps_its_message(tiny, tmp_path):
    from tests.test_ui_sync import _ordered_inputs, handler
    from ui.app import build_app
    from ui.schema_ui import settings_to_values
    config, _ = app_folders(tmp_path, allowed_roots=[str(tiny["data"].parent)])
    demo = build_app(config)
    controller = demo.studio_controller
    s, _ = settings_for(tiny, tmp_path, saving__output_name="long", schedule__max_train_steps=100_000)
    assert controller.start(s)[0]
    try:
        start = handler(demo, "run-start", "click")
        values = settings_to_values(s)
        message = start.fn(*[values[n] for n in _ordered_inputs(start)])
        assert message.startswith("✗ The run 'long' (started ") and "is in progress" in message
        notice = demo.studio_run_widgets["notice"]
        assert notice in start.outputs
        poll = next(d for d in demo.fns.values() if getattr(d.fn, "__name__", "") == "poll")
        assert notice not in poll.outputs  # the shared status updates never overwrite a tab's own message
        ask = handler(demo, "run-stop", "click").fn()
        assert ask[0]["visible"] and ask[1].startswith("Stop the run 'long' (started ")
        assert controller.running  # asking stops nothing
        hide, said = handler(demo, "run-stop-confirm", "click").fn()
        assert not hide["visible"] and said.startswith("■ Stopping… 'long' (started ")
    finally:
        controller.stop()
        controller.wait(120)
