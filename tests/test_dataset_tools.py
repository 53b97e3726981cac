"""The Dataset tools tab: caption editor, bulk tag operations and captioning with a local model.

- the caption editor's handlers edit exactly one caption file, atomically, and leave the others alone;
- add / remove / replace a tag over a folder gives exact file contents, never duplicates a tag, treats a missing
  caption file as empty and writes nothing when one caption cannot be read;
- bad input (no images, a corrupt image, a path outside the app's folders, a model folder that is not a
  captioner) gets a message saying what is wrong;
- a tiny random BLIP, saved like a downloaded model, captions a folder in a fresh process: every image gets a
  caption starting with the prefix, existing captions stay unless overwrite is on, the counts are right;
- the app builds with the tab; optionally (Chromium present) a caption edit round trip in a real browser.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from core.config import AppConfig
from tests.tiny_models import build_tiny_dataset
from ui.dataset_tools_tab import (caption_handler, load_folder_handler, save_caption_handler, select_handler,
                                  tag_handler)

ROOT = Path(__file__).resolve().parent.parent
NAMES = [f"img_{i:03d}" for i in range(4)]


def _config(tmp_path: Path) -> AppConfig:
    for d in ("models", "datasets", "outputs", "presets"):
        (tmp_path / d).mkdir(exist_ok=True)
    return AppConfig(models_dir=str(tmp_path / "models"), datasets_dir=str(tmp_path / "datasets"),
                     outputs_dir=str(tmp_path / "outputs"), presets_dir=str(tmp_path / "presets"),
                     training_defaults=str(ROOT / "training.json"))


@pytest.fixture
def app_dirs(tmp_path):
    config = _config(tmp_path)
    folder = build_tiny_dataset(tmp_path / "datasets" / "set", n=4)
    return config, folder


def _texts(folder: Path) -> dict[str, str | None]:
    """Caption file contents by image stem (None: no caption file)."""
    return {n: (folder / f"{n}.txt").read_text(encoding="utf-8") if (folder / f"{n}.txt").exists() else None
            for n in NAMES}


def _no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]


# -- caption editor --------------------------------------------------------------------------------------------

def test_caption_edit_round_trip(app_dirs):
    config, folder = app_dirs
    before = _texts(folder)
    status, gallery, names = load_folder_handler("set", config)
    assert status.startswith("4 images in ") and "4 with a caption" in status
    assert names == [f"{n}.png" for n in NAMES]
    assert len(gallery) == 4
    thumbs = config.path("outputs_dir") / ".thumbnails"
    for (thumb, label), name, stem in zip(gallery, names, NAMES):
        assert Path(thumb).parent == thumbs and Path(thumb).is_file()  # a copy: never the user's file itself
        assert label == f"{name}: {before[stem].strip()}"

    caption, msg = select_handler("set", "img_001.png", config)
    assert caption == before["img_001"].strip() and "img_001.png" in msg

    msg = save_caption_handler("set", "img_001.png", "  sks dog, sitting \n", config)
    assert msg == "✓ Saved img_001.txt."
    after = _texts(folder)
    assert after["img_001"] == "sks dog, sitting\n"
    assert {k: v for k, v in after.items() if k != "img_001"} == {k: v for k, v in before.items() if k != "img_001"}
    assert select_handler("set", "img_001.png", config)[0] == "sks dog, sitting"
    assert _no_temp_files(folder)

    # the gallery shows the new caption; a typed absolute path inside the app's folders works too
    _, gallery, _ = load_folder_handler(str(folder), config)
    assert gallery[1][1] == "img_001.png: sks dog, sitting"


def test_missing_caption_is_empty_and_created_on_save(app_dirs):
    config, folder = app_dirs
    (folder / "img_002.txt").unlink()
    status, gallery, _ = load_folder_handler("set", config)
    assert "3 with a caption" in status and gallery[2][1] == "img_002.png: (no caption)"
    assert select_handler("set", "img_002.png", config) == ("", "Editing the caption of img_002.png.")
    assert save_caption_handler("set", "img_002.png", "new", config).startswith("✓")
    assert (folder / "img_002.txt").read_text(encoding="utf-8") == "new\n"


def test_editor_refuses_bad_names(app_dirs):
    config, folder = app_dirs
    before = _texts(folder)
    for name in ("", "../set/img_000.png", "nope.png", "img_000.txt"):
        msg = save_caption_handler("set", name, "x", config)
        assert msg.startswith("✗"), name
    assert _texts(folder) == before
    assert not (folder / "nope.txt").exists()


# -- bulk tags --------------------------------------------------------------------------------------------------

def _write(folder: Path, captions_by_stem: dict[str, str | None]) -> None:
    for stem, text in captions_by_stem.items():
        path = folder / f"{stem}.txt"
        if text is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(text, encoding="utf-8")


def test_bulk_tag_operations_exact_contents(app_dirs):
    config, folder = app_dirs
    _write(folder, {"img_000": "a, b\n", "img_001": "b,c", "img_002": None, "img_003": "A,  B , d\n"})

    # add at the end: present (case/space-insensitive) → untouched; missing caption file → created
    msg = tag_handler("set", "add", "b", "", "end", config)
    assert msg == '✓ Added "b" at the end: 1 of 4 caption files changed, 3 unchanged.'
    assert _texts(folder) == {"img_000": "a, b\n", "img_001": "b,c", "img_002": "b\n", "img_003": "A,  B , d\n"}

    # add at the start, two tags at once (one of them already in some captions; duplicates in the input dropped)
    msg = tag_handler("set", "add", "sks, c, sks", "", "start", config)
    assert "4 of 4 caption files changed" in msg
    assert _texts(folder) == {"img_000": "sks, c, a, b\n", "img_001": "sks, b, c\n", "img_002": "sks, c, b\n",
                              "img_003": "sks, c, A, B, d\n"}

    # adding again changes nothing: no duplicates
    assert "0 of 4 caption files changed" in tag_handler("set", "add", "SKS", "", "end", config)
    assert "0 of 4" in tag_handler("set", "add", "c", "", "start", config)

    # remove (case-insensitive)
    msg = tag_handler("set", "remove", "B", "", "end", config)
    assert msg == '✓ Removed "B": 4 of 4 caption files changed, 0 unchanged.'
    assert _texts(folder) == {"img_000": "sks, c, a\n", "img_001": "sks, c\n", "img_002": "sks, c\n",
                              "img_003": "sks, c, A, d\n"}

    # replace in place; a replacement already present is not added twice
    msg = tag_handler("set", "replace", "a", "d", "end", config)
    assert msg == '✓ Replaced "a" with "d": 2 of 4 caption files changed, 2 unchanged.'
    assert _texts(folder) == {"img_000": "sks, c, d\n", "img_001": "sks, c\n", "img_002": "sks, c\n",
                              "img_003": "sks, c, d\n"}
    msg = tag_handler("set", "replace", "c", "red hair", "end", config)
    assert "4 of 4" in msg
    assert _texts(folder) == {"img_000": "sks, red hair, d\n", "img_001": "sks, red hair\n",
                              "img_002": "sks, red hair\n", "img_003": "sks, red hair, d\n"}

    # removing the last tag leaves an empty caption file
    tag_handler("set", "remove", "sks, red hair, d", "", "end", config)
    assert set(_texts(folder).values()) == {""}
    assert _no_temp_files(folder)


def test_bulk_tags_in_subfolders_and_bad_input(app_dirs):
    config, folder = app_dirs
    sub = build_tiny_dataset(folder / "10_dog", n=1)  # a repeats subfolder: training reads it, so do we
    (sub / "img_000.txt").write_text("dog", encoding="utf-8")
    assert "5 of 5" in tag_handler("set", "add", "new", "", "end", config)
    assert (sub / "img_000.txt").read_text(encoding="utf-8") == "dog, new\n"

    assert tag_handler("set", "add", " , ", "", "end", config).startswith("✗ Type the tag to add")
    assert tag_handler("set", "replace", "a, b", "c", "end", config).startswith("✗ Replace one tag at a time")
    assert "use Remove" in tag_handler("set", "replace", "new", "", "end", config)
    assert tag_handler("set", "add", "x", "", "middle", config).startswith("✗ position must be")

    # one caption that is not UTF-8: nothing is written, and the file is named
    (folder / "img_003.txt").write_bytes(b"caf\xe9, tag")
    before = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*.txt")}
    msg = tag_handler("set", "add", "zzz", "", "end", config)
    assert msg.startswith("✗ 1 caption file(s) cannot be read, so no caption was changed") and "img_003.txt" in msg
    assert {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*.txt")} == before


# -- bad input --------------------------------------------------------------------------------------------------

def test_folder_problems_are_explained(app_dirs, tmp_path):
    config, folder = app_dirs
    (config.path("datasets_dir") / "empty").mkdir()
    (config.path("datasets_dir") / "empty" / "notes.txt").write_text("x")
    msg, gallery, names = load_folder_handler("empty", config)
    assert msg.startswith("✗ No images (png, jpg, jpeg, webp, bmp) in ") and "Copy your images" in msg
    assert gallery == [] and names == []
    assert tag_handler("empty", "add", "x", "", "end", config).startswith("✗ No images")

    assert load_folder_handler("", config)[0].startswith("✗ Choose a dataset folder")
    assert "does not exist" in load_folder_handler("missing", config)[0]
    outside = tmp_path.parent / "elsewhere"
    for text in (str(outside), "../../elsewhere"):
        msg = load_folder_handler(text, config)[0]
        assert msg.startswith("✗ Dataset folder: ") and "outside the folders this app may use" in msg
        assert "outside the folders" in save_caption_handler(text, "img_000.png", "x", config)
        assert "outside the folders" in tag_handler(text, "add", "x", "", "end", config)

    # a corrupt image: the others are shown, the broken one is named
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    msg, gallery, names = load_folder_handler("set", config)
    assert msg.startswith("⚠ 4 images in") and "1 file(s) cannot be shown" in msg and "broken.png" in msg
    assert "broken.png" not in names and len(gallery) == 4


# -- captioning with a local model -------------------------------------------------------------------------------

def build_tiny_blip(folder: Path) -> Path:
    """A random BLIP captioner (hidden size 32, one layer each, 32 px images) with a BERT tokenizer built from a
    small vocabulary file, saved as ``save_pretrained`` writes a downloaded model."""
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    folder.mkdir(parents=True, exist_ok=True)
    vocab_file = folder.parent / "tiny_blip_vocab.txt"
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    vocab_file.write_text("\n".join(special + [f"word{i}" for i in range(58)]) + "\n", encoding="utf-8")
    vocab = {w: i for i, w in enumerate(vocab_file.read_text(encoding="utf-8").split())}
    tokenizer = BertTokenizer(vocab=vocab, bos_token="[DEC]")
    config = BlipConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, encoder_hidden_size=32, max_position_embeddings=64,
                         bos_token_id=vocab["[DEC]"], sep_token_id=vocab["[SEP]"], eos_token_id=vocab["[SEP]"],
                         pad_token_id=vocab["[PAD]"]),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=32)
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).eval().save_pretrained(folder)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(folder)
    return folder


def build_tiny_florence2(folder: Path) -> Path:
    """A random transformers-native Florence-2 (tiny DaViT, one-layer BART, 64 px images → 2×2 + 1 image
    tokens) with a byte-level BPE tokenizer of the 256 byte symbols (no merges), saved like a download."""
    import torch
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import (BartTokenizer, CLIPImageProcessor, Florence2Config, Florence2ForConditionalGeneration,
                              Florence2Processor)

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {w: i for i, w in enumerate(["<s>", "<pad>", "</s>", "<unk>"] + sorted(ByteLevel.alphabet()) + ["<mask>"])}
    tokenizer = BartTokenizer(vocab=vocab, merges=[], extra_special_tokens={"image_token": "<image>"})
    image_processor = CLIPImageProcessor(size={"height": 64, "width": 64}, do_center_crop=False)
    image_processor.image_seq_length = 5
    config = Florence2Config(
        vision_config=dict(depths=[1, 1, 1, 1], embed_dim=[8, 16, 16, 32], num_heads=[1, 2, 2, 2],
                           num_groups=[1, 2, 2, 2], window_size=2, projection_dim=32, drop_path_rate=0.0,
                           max_position_embeddings=8, max_temporal_embeddings=4),
        text_config=dict(model_type="bart", vocab_size=len(tokenizer), d_model=32, encoder_layers=1,
                         decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                         decoder_ffn_dim=64, max_position_embeddings=128, bos_token_id=0, pad_token_id=1,
                         eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2),
        image_token_id=tokenizer.image_token_id)
    torch.manual_seed(0)
    Florence2ForConditionalGeneration(config).eval().save_pretrained(folder)
    Florence2Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory):
    return build_tiny_blip(tmp_path_factory.mktemp("captioners") / "tiny-blip")


@pytest.fixture(scope="module")
def tiny_florence2(tmp_path_factory):
    return build_tiny_florence2(tmp_path_factory.mktemp("captioners") / "tiny-florence2")


CAPTION_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from core.captioner import caption_folder
    folder, blip, florence = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    out = []
    for model, prefix, overwrite, batch in ((blip, "sks", False, 2), (blip, "zzz,", True, 3),
                                            (florence, "flo", True, 4)):
        calls = []
        s = caption_folder(folder, model, prefix=prefix, max_new_tokens=6, batch_size=batch, overwrite=overwrite,
                           task="<CAPTION>", progress=lambda done, total: calls.append((done, total)))
        texts = {p.name: p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.txt"))}
        out.append(dict(captioned=s.captioned, skipped=s.skipped, failed=s.failed, text=s.text(), calls=calls,
                        texts=texts))
    print("RESULT " + json.dumps(out))
""")


def test_blip_and_florence2_caption_a_folder_in_a_fresh_process(tiny_blip, tiny_florence2, tmp_path):
    folder = build_tiny_dataset(tmp_path / "set", n=4)
    for stem in ("img_000", "img_002", "img_003"):
        (folder / f"{stem}.txt").unlink()
    (folder / "img_002.txt").write_text("\n", encoding="utf-8")  # an empty caption file counts as no caption
    (folder / "img_001.txt").write_text("keep me\n", encoding="utf-8")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")

    proc = subprocess.run([sys.executable, "-c", CAPTION_SCRIPT, str(folder), str(tiny_blip), str(tiny_florence2)],
                          cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, second, florence = json.loads(proc.stdout.split("RESULT ", 1)[1])

    # without overwrite: the image with a caption is skipped, the corrupt one fails by name, the rest captioned
    assert (first["captioned"], first["skipped"]) == (3, 1)
    assert len(first["failed"]) == 1 and first["failed"][0].startswith("broken.png: not a readable image")
    assert first["text"].startswith("captioned 3, skipped 1 that already had captions, 1 failed:\n  broken.png")
    assert first["calls"][0] == [0, 4] and first["calls"][-1] == [4, 4]
    assert first["texts"]["img_001.txt"] == "keep me\n"
    for stem in ("img_000", "img_002", "img_003"):
        text = first["texts"][f"{stem}.txt"]
        assert text.startswith("sks, ") and len(text.strip()) > len("sks,") and text.endswith("\n")
        assert "\n" not in text.rstrip("\n")
    assert "broken.txt" not in first["texts"]

    # with overwrite: every readable image gets a new caption, the old one included
    assert (second["captioned"], second["skipped"], len(second["failed"])) == (4, 0, 1)
    assert second["calls"][-1] == [5, 5]
    for stem in NAMES:
        text = second["texts"][f"{stem}.txt"]
        assert text.startswith("zzz, ") and len(text.strip()) > len("zzz,")

    # Florence-2 (task prompt, encoder-decoder generation) through the same path
    assert (florence["captioned"], florence["skipped"], len(florence["failed"])) == (4, 0, 1)
    for stem in NAMES:
        text = florence["texts"][f"{stem}.txt"]
        assert text.startswith("flo, ") and len(text.strip()) > len("flo,")
    assert _no_temp_files(folder)


def test_caption_handler_skips_without_loading_and_refuses_non_captioners(tiny_blip, app_dirs):
    config, folder = app_dirs
    models = config.path("models_dir")
    # a supported model folder (only its config.json is read when nothing needs captioning)
    (models / "blip").mkdir()
    (models / "blip" / "config.json").write_text((tiny_blip / "config.json").read_text())
    msg = caption_handler("set", "blip", "sks", 20, 4, False, "<MORE_DETAILED_CAPTION>", config)
    assert msg == "✓ Captioned 0, skipped 4 that already had captions, 0 failed"

    from core.captioner import find_captioners
    (models / "sd-vae").mkdir()
    (models / "sd-vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    (models / "clip").mkdir()
    (models / "clip" / "config.json").write_text(json.dumps({"architectures": ["CLIPTextModel"],
                                                              "model_type": "clip_text_model"}))
    (models / "florence-remote").mkdir()
    (models / "florence-remote" / "config.json").write_text(json.dumps(
        {"architectures": ["Florence2ForConditionalGeneration"], "model_type": "florence2",
         "auto_map": {"AutoModelForCausalLM": "modeling_florence2.Florence2ForConditionalGeneration"}}))
    (models / "group" / "florence-native").mkdir(parents=True)
    (models / "group" / "florence-native" / "config.json").write_text(json.dumps(
        {"architectures": ["Florence2ForConditionalGeneration"], "model_type": "florence2"}))
    (models / "no-config").mkdir()
    assert find_captioners(models) == [("blip (BLIP)", "blip"),
                                       ("group/florence-native (Florence-2)", "group/florence-native")]

    before = _texts(folder)
    msg = caption_handler("set", "clip", "", 20, 4, True, "<CAPTION>", config)
    assert msg.startswith("✗ clip is not a supported captioning model (its config.json says CLIPTextModel)")
    assert "BlipForConditionalGeneration" in msg and "Florence2ForConditionalGeneration" in msg
    msg = caption_handler("set", "sd-vae", "", 20, 4, True, "<CAPTION>", config)
    assert "not a supported captioning model" in msg and "no architecture" in msg
    assert "has no config.json" in caption_handler("set", "no-config", "", 20, 4, True, "<CAPTION>", config)
    assert "needs code from the model folder" in caption_handler("set", "florence-remote", "", 20, 4, True,
                                                                 "<CAPTION>", config)
    assert caption_handler("set", "", "", 20, 4, True, "<CAPTION>", config).startswith("✗ Choose a captioning")
    assert "outside the folders" in caption_handler("set", str(tiny_blip), "", 20, 4, True, "<CAPTION>", config)
    assert "Batch size must be" in caption_handler("set", "blip", "", 20, 0, True, "<CAPTION>", config)
    assert "whole numbers" in caption_handler("set", "blip", "", "many", 4, True, "<CAPTION>", config)
    assert _texts(folder) == before


# -- the app -----------------------------------------------------------------------------------------------------

def test_app_has_the_tab(tmp_path):
    from ui.app import build_app

    config = _config(tmp_path)
    build_tiny_dataset(config.path("datasets_dir") / "set", n=2)
    demo = build_app(config)
    ids = {getattr(b, "elem_id", None) for b in demo.blocks.values()}
    assert {"tab-dataset-tools", "dtools-folder", "dtools-gallery", "dtools-caption", "dtools-save",
            "dtools-add", "dtools-remove", "dtools-replace", "dtools-model", "dtools-caption-run"} <= ids
    folder = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "dtools-folder")
    assert folder.value == "set"


def test_caption_edit_in_the_browser(tmp_path, tiny_blip):
    """The real page (Chromium, when installed): load a folder, see its thumbnails, select an image, edit and
    save its caption, add a tag to all captions, caption them with the tiny BLIP."""
    if not Path("/usr/bin/chromium").exists():
        pytest.skip("/usr/bin/chromium is missing (apt-get install chromium)")
    from tests.test_ui_browser import browser_page, expect_text, open_tab
    from ui.app import launch

    config = _config(tmp_path)
    config.port = 0
    folder = build_tiny_dataset(config.path("datasets_dir") / "set", n=4)
    shutil.copytree(tiny_blip, config.path("models_dir") / "tiny-blip")
    before = _texts(folder)
    demo = launch(config, prevent_thread_lock=True, quiet=True)
    try:
        with browser_page(demo.local_url) as page:
            open_tab(page, "Dataset tools")
            page.locator("#dtools-load").click()
            expect_text(page.locator("#dtools-status"), "4 images in", timeout_s=60)
            # the thumbnails are served (the app allows exactly those files) and decode in the browser
            page.wait_for_function("[...document.querySelectorAll('#dtools-gallery img')]"
                                   ".filter(i => i.complete && i.naturalWidth > 0).length >= 4", timeout=60_000)
            page.locator("#dtools-gallery img").nth(1).click()
            page.wait_for_function("document.querySelector('#dtools-selected input, #dtools-selected textarea')"
                                   ".value === 'img_001.png'", timeout=60_000)
            caption = page.locator("#dtools-caption textarea")
            assert caption.input_value() == before["img_001"].strip()
            caption.fill("sks dog, in the browser")
            page.locator("#dtools-save").click()
            expect_text(page.locator("#dtools-save-status"), "Saved img_001.txt")
            after = _texts(folder)
            assert after["img_001"] == "sks dog, in the browser\n"
            assert {k: v for k, v in after.items() if k != "img_001"} == \
                {k: v for k, v in before.items() if k != "img_001"}

            page.locator("#dtools-tags input, #dtools-tags textarea").first.fill("solo")
            page.locator("#dtools-add").click()
            expect_text(page.locator("#dtools-tag-status"), "4 of 4 caption files changed")
            assert _texts(folder)["img_001"] == "sks dog, in the browser, solo\n"
            expect_text(page.locator("#dtools-gallery"), "img_001.png: sks dog, in the browser, solo")

            # captioning: the model listed from the models folder is preselected; all have captions → skipped
            page.locator("#dtools-caption-run").click()
            expect_text(page.locator("#dtools-caption-status"),  # waits for the app's start-up warm-up first
                        "Captioned 0, skipped 4 that already had captions, 0 failed", timeout_s=180)
            page.locator("#dtools-prefix input").fill("trig")
            page.locator("#dtools-overwrite input[type=checkbox]").set_checked(True)
            page.locator("#dtools-caption-run").click()
            expect_text(page.locator("#dtools-caption-status"), "Captioned 4, skipped 0", timeout_s=120)
            # the default 128 new tokens is more than the tiny model's 64 positions allow: lowered, and said so
            expect_text(page.locator("#dtools-caption-status"), "max new tokens lowered to 62")
            assert all(t.startswith("trig, ") and len(t) > len("trig, \n") for t in _texts(folder).values())
    finally:
        demo.studio_controller.stop()
        demo.studio_controller.wait(60)
        demo.close()
