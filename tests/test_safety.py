"""Safe on a shared box: config.json's login is validated and a share link never opens without one; files are
written with the user's umask."""
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
