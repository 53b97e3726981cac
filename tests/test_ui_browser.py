"""The app in a real browser (Playwright + Debian's Chromium): fill the tabs, train a tiny SD1.5 LoRA with the
real ``core.train``, watch progress and previews arrive, and find the final .safetensors file.

Also writes one screenshot per tab into docs/screenshots/ (1280 px wide) for the README.

Chromium lives at /usr/bin/chromium (``apt-get install chromium``).  Without it the test is skipped, except
in CI (``CI=true``), where a missing browser is a failure.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import time
from pathlib import Path

import pytest

from core.config import AppConfig
from tests.tiny_models import build_conditioning_folder, build_tiny_controlnet_base, build_tiny_dataset, build_tiny_sd15

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]
SCREENSHOTS = ROOT / "docs" / "screenshots"
TABS = [("dataset", "Dataset"), ("model", "Model"), ("network", "Network"), ("optimizer", "Optimizer"),
        ("output", "Saving & previews"), ("run", "Run")]
RUN_TIMEOUT_S = 300


def _require_chromium() -> None:
    if CHROMIUM.exists():
        return
    message = f"{CHROMIUM} is missing (apt-get install chromium)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    _require_chromium()
    from ui.app import launch

    root = tmp_path_factory.mktemp("studio")
    dirs = {name: root / name for name in ("models", "datasets", "outputs", "presets")}
    for d in dirs.values():
        d.mkdir()
    build_tiny_sd15(dirs["models"] / "tiny-sd15", "diffusers")
    build_tiny_controlnet_base("sd15", dirs["models"] / "tiny-sd15-cn")
    dataset = build_tiny_dataset(dirs["datasets"] / "squares", n=4)
    build_conditioning_folder(dataset, dirs["datasets"] / "squares-edges")
    config = AppConfig(host="127.0.0.1", port=0, models_dir=str(dirs["models"]),
                       datasets_dir=str(dirs["datasets"]), outputs_dir=str(dirs["outputs"]),
                       presets_dir=str(dirs["presets"]), training_defaults=str(ROOT / "training.json"))
    demo = launch(config, prevent_thread_lock=True, quiet=True)
    try:
        yield {"url": demo.local_url, "demo": demo, "config": config, "dataset": Path(dataset), **dirs}
    finally:
        demo.studio_controller.stop()
        demo.studio_controller.wait(60)
        demo.close()


@contextlib.contextmanager
def browser_page(url: str):
    """A Chromium page on the app at ``url``, once the settings controls are there."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            pg = browser.new_page(viewport={"width": 1280, "height": 900})
            pg.set_default_timeout(20_000)
            pg.goto(url)
            pg.wait_for_selector("#setting-dataset-path")
            yield pg
        finally:
            browser.close()


@pytest.fixture(scope="module")
def page(studio):
    with browser_page(studio["url"]) as pg:
        yield pg


# -- helpers: set a generated control by its elem_id ----------------------------------------------------

def sid(dotted: str) -> str:
    section, name = dotted.split(".")
    return f"#setting-{section}-{name}"


def open_tab(page, label: str) -> None:
    page.get_by_role("tab", name=label, exact=True).click()
    page.wait_for_timeout(300)


def open_run_choices(page) -> None:
    """The Run tab keeps its settings folded under Start, status and the plan."""
    from ui.app import RUN_CHOICES
    acc = page.locator("#run-choices")
    if not acc.locator(sid_any_inside()).first.is_visible():
        acc.get_by_text(RUN_CHOICES, exact=True).first.click()
        page.wait_for_timeout(300)


def open_advanced(page, tab_id: str) -> None:
    if tab_id == "run":
        open_run_choices(page)
    acc = page.locator(f"#advanced-{tab_id}")
    if not acc.locator(sid_any_inside()).first.is_visible():
        acc.get_by_text("Advanced", exact=True).first.click()
        page.wait_for_timeout(300)


def sid_any_inside() -> str:
    return "[id^='setting-']"


def fill(page, dotted: str, value) -> None:
    """Text boxes and number boxes: type the value and leave the field (Gradio sends it on input/blur)."""
    box = page.locator(f"{sid(dotted)} input:not([type=range]), {sid(dotted)} textarea").first
    box.fill(str(value))
    box.press("Tab")


def check(page, dotted: str, on: bool) -> None:
    page.locator(f"{sid(dotted)} input[type=checkbox]").set_checked(on)


def choose(page, dotted: str, value: str) -> None:
    """A choice field, whichever widget the generator picked for it (radio buttons or a dropdown).
    ``value`` is the settings value; the page shows its label where the field declares one."""
    from core.settings import field_ui
    value = (field_ui(dotted)["choice_labels"] or {}).get(value, value)
    if page.locator(f"{sid(dotted)} input[type=radio]").count():
        page.locator(f"{sid(dotted)} label").filter(has_text=re.compile(rf"^\s*{re.escape(value)}\s*$")).click()
    else:
        choose_dropdown(page, dotted, value)


def choose_dropdown(page, dotted: str, value: str) -> None:
    """Open the dropdown and click the listed option (so the list itself is tested)."""
    box = page.locator(f"{sid(dotted)} input").first
    box.click()
    page.get_by_role("option", name=value, exact=True).click()
    page.wait_for_timeout(200)


def expect_text(locator, text: str, timeout_s: float = 20) -> None:
    """Wait until ``locator`` shows ``text`` (the plan is recomputed on the server after each change)."""
    deadline = time.time() + timeout_s
    while text not in locator.inner_text():
        if time.time() > deadline:
            raise AssertionError(f"{text!r} not shown; the element says: {locator.inner_text()[:500]}")
        time.sleep(0.2)


def is_shown(page, dotted: str) -> bool:
    return page.locator(sid(dotted)).first.is_visible()


def shoot(page, tab_id: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{tab_id}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


# -- the test -------------------------------------------------------------------------------------------

def test_train_a_tiny_lora_in_the_browser(studio, page):
    # Dataset: picked from the datasets folder, and checked before Start
    open_tab(page, "Dataset")
    choose_dropdown(page, "dataset.path", studio["dataset"].name)
    fill(page, "dataset.resolution", 64)
    expect_text(page.locator("#dataset-summary"), "4 images, 4 with a caption file")
    expect_text(page.locator("#dataset-summary"), "64×64")
    page.wait_for_function("document.querySelectorAll('#dataset-gallery img').length >= 2", timeout=20_000)
    # long help: its first sentence, the rest behind "more"
    path_help = page.locator(sid("dataset.path"))
    assert "Subfolders named like" not in path_help.inner_text()
    path_help.locator("a.help-more").click()
    expect_text(path_help, "Subfolders named like '10_dog' repeat their images")
    assert is_shown(page, "dataset.bucket_no_upscale")
    check(page, "dataset.enable_buckets", False)
    page.wait_for_timeout(500)
    assert not is_shown(page, "dataset.bucket_no_upscale"), "show_if: bucket options hide with buckets off"

    # Model: options of other families appear live for them only, and leave no gap once hidden again
    open_tab(page, "Model")
    _check_live_visibility(page, "model.architecture")
    choose(page, "model.architecture", "sd15")
    # the tiny model is listed from the models folder
    choose_dropdown(page, "model.model_path", "tiny-sd15")

    # Network
    open_tab(page, "Network")
    fill(page, "network.rank", 4)
    fill(page, "network.alpha", 4)

    # Optimizer + schedule
    open_tab(page, "Optimizer")
    fill(page, "optimizer.learning_rate", 0.001)
    assert not is_shown(page, "optimizer.lr_scheduler_num_cycles")
    fill(page, "schedule.max_train_steps", 4)
    fill(page, "schedule.train_batch_size", 1)
    open_advanced(page, "optimizer")
    fill(page, "schedule.log_every_n_steps", 1)

    # Saving & previews
    open_tab(page, "Saving & previews")
    fill(page, "saving.output_name", "browser_lora")
    fill(page, "sampling.sample_every_n_steps", 2)
    fill(page, "sampling.prompts", "a red square")
    fill(page, "sampling.steps", 2)

    # The values reached the server as typed settings: save them as a preset and read the file back.
    page.locator("#preset-name input").first.fill("browser-test")
    page.locator("#preset-name input").first.press("Enter")
    page.locator("#preset-save").click()
    preset = studio["presets"] / "browser-test.json"
    deadline = time.time() + 20
    while not preset.exists() and time.time() < deadline:
        time.sleep(0.2)
    saved = json.loads(preset.read_text())
    assert saved["dataset"]["path"] == studio["dataset"].name
    assert saved["dataset"]["resolution"] == 64 and saved["dataset"]["enable_buckets"] is False
    assert saved["model"]["model_path"] == "tiny-sd15" and saved["network"]["rank"] == 4
    assert saved["schedule"]["max_train_steps"] == 4 and saved["schedule"]["log_every_n_steps"] == 1
    assert saved["sampling"]["prompts"] == "a red square" and saved["sampling"]["sample_every_n_steps"] == 2

    # Run: the plan and its estimate follow the settings live (the tiny model's own config is estimated)
    open_tab(page, "Run")
    plan = page.locator("#run-plan")
    expect_text(plan, "RAM estimate ≈")
    expect_text(plan, "gradient checkpointing off")
    # Start, the status and the plan are at the top of the tab, the memory choices folded below them
    start_box = page.locator("#run-start").bounding_box()
    assert start_box["y"] + start_box["height"] < 800, start_box          # visible without scrolling at 1280×800
    assert not page.locator(sid("memory.gradient_checkpointing")).is_visible()
    open_run_choices(page)
    choose(page, "memory.gradient_checkpointing", "on")
    expect_text(plan, "gradient checkpointing on")
    choose(page, "memory.gradient_checkpointing", "auto")
    expect_text(plan, "gradient checkpointing off")
    page.locator("#run-start").click()
    final = _wait_for_final(page)
    assert final.suffix == ".safetensors" and final.is_file()
    assert str(final).startswith(str(studio["outputs"]))
    assert "Step 4 / 4" in page.locator("#run-progress").inner_text()
    page.wait_for_function("document.querySelectorAll('#run-gallery img').length > 0", timeout=20_000)
    assert "Finished" in page.locator("#run-status").inner_text()
    assert page.locator("#run-start").is_enabled() and not page.locator("#run-stop").is_enabled()
    _check_loss_chart_ticks(page)

    # Screenshots for the README, each tab with this run's settings.  The Run tab first, while it still
    # shows the log scrolled to its end (switching tabs re-renders it scrolled to the top).
    page.wait_for_timeout(2500)
    log_box = page.locator("#run-log textarea")
    assert log_box.evaluate("t => t.scrollHeight - t.scrollTop - t.clientHeight") < 30, "the log follows its end"
    shots = [shoot(page, "run")]
    for tab_id, label in TABS:
        if tab_id != "run":
            open_tab(page, label)
            page.wait_for_timeout(400)
            shots.append(shoot(page, tab_id))
    for shot in shots:
        assert shot.stat().st_size > 10_000
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the run's state is offered for resuming (newest first), by step and date
    open_tab(page, "Saving & previews")
    page.locator("#refresh-saving-resume_from").click()
    page.wait_for_timeout(500)
    page.locator(f"{sid('saving.resume_from')} input").first.click()
    option = page.get_by_role("option", name=re.compile(r"^step 4 · \d{4}-\d\d-\d\d \d\d:\d\d · browser_lora"))
    option.first.click()
    page.keyboard.press("Escape")


def _check_loss_chart_ticks(page) -> None:
    """The chart's step axis is labelled with whole steps, each once (a tick between two steps would show as
    1.5, or twice as 2 with the integer format)."""
    labels = page.evaluate("""() => [...document.querySelectorAll('#run-loss svg g.role-axis')]
        .filter(g => (g.getAttribute('aria-label') || '').startsWith('X-axis'))
        .flatMap(g => [...g.querySelectorAll('g.role-axis-label text')].map(t => t.textContent))""")
    assert len(labels) >= 3, labels
    assert all(re.fullmatch(r"\d+", label) for label in labels) and len(set(labels)) == len(labels), labels


def test_tool_family_dropdowns_fit_their_longest_name(studio, page):
    open_tab(page, "Tools")
    for eid in ("tools-merge-arch", "tools-extract-arch"):
        box = page.locator(f"#{eid} input").first
        box.click()
        names = [o.inner_text().strip() for o in page.get_by_role("option").all()]
        longest = max(names, key=len)
        page.get_by_role("option", name=longest, exact=True).click()
        page.wait_for_timeout(200)
        assert box.input_value() == longest
        # the text ends before the arrow: it fits the box without scrolling
        assert box.evaluate("e => e.scrollWidth <= e.clientWidth"), (eid, longest)


def _check_live_visibility(page, governing: str) -> None:
    """Pick a basic (not advanced) field that ``governing`` shows only for another value; switching to that
    value shows it, switching back hides it (generated from the schema, not from a list of names)."""
    from core.settings import Settings, field_ui
    from ui.schema_ui import governing_fields

    current = Settings().get(governing)
    for dotted in governing_fields().get(governing, []):
        ui = field_ui(dotted)
        if ui["advanced"] or len(ui["show_if"]) != 1 or current in ui["show_if"][governing]:
            continue
        other = ui["show_if"][governing][0]
        assert not is_shown(page, dotted)
        choose(page, governing, other)
        page.wait_for_function(f"(() => {{ const e = document.querySelector('{sid(dotted)}');"
                               f" return e && e.offsetParent !== null; }})()", timeout=10_000)
        choose(page, governing, current)
        page.wait_for_timeout(500)
        assert not is_shown(page, dotted), f"{dotted} stays shown after switching {governing} back"
        return


def _wait_for_final(page) -> Path:
    """Wait until the Run tab names the final file; fail early with the status and log if the run fails."""
    deadline = time.time() + RUN_TIMEOUT_S
    while time.time() < deadline:
        outputs = page.locator("#run-outputs").inner_text()
        m = re.search(r"Final adapter:\s*(\S+\.safetensors)", outputs)
        progress = page.locator("#run-progress").inner_text()
        if m and "Step 4 / 4" in progress:
            return Path(m.group(1))
        status = page.locator("#run-status").inner_text()
        if "Failed" in status or "✗" in status:
            log = page.locator("#run-log textarea").input_value()
            pytest.fail(f"the run failed: {status}\n--- log ---\n{log}")
        time.sleep(0.5)
    log = page.locator("#run-log textarea").input_value()
    pytest.fail(f"no final adapter after {RUN_TIMEOUT_S} s; status: "
                f"{page.locator('#run-status').inner_text()}\n--- log ---\n{log}")


def load_preset(studio, page, name: str, **values) -> None:
    """A preset of the tiny dataset at 64 px (training.json's defaults, ``values`` as ``section__name``) written
    into the presets folder and loaded through the Presets box."""
    from core.settings import load_settings, save_settings

    s = load_settings(ROOT / "training.json")
    values = {"dataset__path": str(studio["dataset"]), "dataset__resolution": 64, "dataset__enable_buckets": False,
              "schedule__log_every_n_steps": 1, "saving__save_every_n_epochs": 0, **values}
    for dotted, value in values.items():
        section, field = dotted.split("__")
        setattr(getattr(s, section), field, value)
    save_settings(s, studio["presets"] / f"{name}.json")
    name_box = page.locator("#preset-name input").first
    name_box.fill(name)
    name_box.press("Enter")
    page.locator("#preset-load").click()


def test_load_a_preset_then_stop_a_long_run(studio, page):
    """A preset file loads into the controls; Stop ends a real run early and it still saves an adapter."""
    load_preset(studio, page, "long-run", model__model_path="tiny-sd15", network__rank=4,
                schedule__max_train_steps=100_000, saving__output_name="stopped_lora",
                sampling__sample_every_n_steps=0)
    open_tab(page, "Saving & previews")
    page.wait_for_function(
        "document.querySelector('#setting-saving-output_name input').value === 'stopped_lora'")
    open_tab(page, "Optimizer")
    assert page.locator(f"{sid('schedule.max_train_steps')} input").input_value() == "100000"

    open_tab(page, "Run")
    page.locator("#run-start").click()
    deadline = time.time() + RUN_TIMEOUT_S
    while time.time() < deadline:
        if re.search(r"Step [1-9]\d* / 100000", page.locator("#run-progress").inner_text()):
            break
        status = page.locator("#run-status").inner_text()
        assert "Failed" not in status, status
        time.sleep(0.3)
    else:
        pytest.fail("the long run did not start training")
    assert page.locator("#run-stop").is_enabled() and not page.locator("#run-start").is_enabled()
    assert "'stopped_lora' (started " in page.locator("#run-status").inner_text()
    _second_tab_sees_the_run_and_cannot_stop_it_by_accident(studio, page)
    page.locator("#run-stop").click()
    expect_text(page.locator("#run-stop-confirm-text"), "Stop the run 'stopped_lora' (started ")
    page.locator("#run-stop-confirm").click()
    page.wait_for_function("document.querySelector('#run-status').innerText.includes('Stopped')",
                           timeout=RUN_TIMEOUT_S * 1000)
    page.wait_for_function("document.querySelector('#run-outputs').innerText.includes('stopped_lora')",
                           timeout=20_000)
    saved = re.findall(r"(\S+stopped_lora\S*\.safetensors)", page.locator("#run-outputs").inner_text())
    assert saved and all(Path(p).is_file() for p in saved)
    assert not studio["demo"].studio_controller.running


def _second_tab_sees_the_run_and_cannot_stop_it_by_accident(studio, page) -> None:
    """Another tab (another user of a share link) sees which run is going; its Stop asks first, naming the run,
    and "Keep training" leaves the run alone."""
    other = page.context.browser.new_page(viewport={"width": 1280, "height": 900})
    try:
        other.goto(studio["url"])
        other.wait_for_selector("#setting-dataset-path")
        open_tab(other, "Run")
        expect_text(other.locator("#run-status"), "'stopped_lora' (started ")
        assert not other.locator("#run-start").is_enabled()
        other.locator("#run-stop").click()
        expect_text(other.locator("#run-stop-confirm-text"), "Stop the run 'stopped_lora' (started ")
        other.locator("#run-stop-cancel").click()
        # the confirmation closes (a server round trip: allow for a loaded machine), and the run goes on
        other.locator("#run-stop-confirm").wait_for(state="hidden", timeout=20_000)
        assert studio["demo"].studio_controller.running
    finally:
        other.close()



def test_train_a_tiny_controlnet_in_the_browser(studio, page):
    """ControlNet from the UI: the algorithm shows its own options (and hides the adapter's), the conditioning
    folder is asked for before Start, and the run saves the single file and the diffusers folder."""
    load_preset(studio, page, "controlnet", model__model_path="tiny-sd15-cn", schedule__max_train_steps=4,
                saving__output_name="browser_controlnet", sampling__sample_every_n_steps=4,
                sampling__prompts="a red square", sampling__steps=2, sampling__width=64, sampling__height=64)

    open_tab(page, "Model")
    page.wait_for_function("document.querySelector('#setting-model-model_path input').value === 'tiny-sd15-cn'")
    open_tab(page, "Network")
    assert is_shown(page, "network.rank") and not is_shown(page, "network.controlnet_init")
    choose(page, "network.algorithm", "controlnet")
    page.wait_for_function(f"(() => {{ const e = document.querySelector('{sid('network.controlnet_init')}');"
                           f" return e && e.offsetParent !== null; }})()", timeout=10_000)
    assert not is_shown(page, "network.rank")
    open_tab(page, "Saving & previews")
    check(page, "saving.save_diffusers_folder", True)

    open_tab(page, "Run")
    page.locator("#run-start").click()   # no conditioning folder yet: refused, naming the setting and its place
    expect_text(page.locator("#run-notice"), "dataset.conditioning_path")
    expect_text(page.locator("#run-notice"), "Dataset → Conditioning images")
    open_tab(page, "Dataset")
    choose_dropdown(page, "dataset.conditioning_path", "squares-edges")
    open_tab(page, "Run")
    page.locator("#run-start").click()
    final = _wait_for_final(page)
    assert final.name == "browser_controlnet.safetensors" and final.is_file()
    folder = final.with_name("browser_controlnet_diffusers")
    assert (folder / "config.json").is_file() and (folder / "diffusion_pytorch_model.safetensors").is_file()
    from safetensors.torch import load_file
    saved = load_file(str(final))
    assert saved and all(k.startswith("control_model.") for k in saved)
    page.wait_for_function("document.querySelectorAll('#run-gallery img').length > 0", timeout=20_000)
    assert "Finished" in page.locator("#run-status").inner_text()
