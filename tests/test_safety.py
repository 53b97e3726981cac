"""Safe on a shared box: config.json's login is validated and a share link never opens without one; files are
written with the user's umask; a run never changes another run's files."""
from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request

import pytest
import torch
from PIL import Image

from core.config import AppConfig, load_config
from core.io import atomic_save_image, atomic_save_safetensors, atomic_torch_save, atomic_write_json
from ui import warmup
from tests.test_run_guards import run, tiny  # noqa: F401 - the tiny SD1.5 fixture and its runner


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
    assert new and all(n.startswith(("same-1", "samples/same-1-")) for n in new), new


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
