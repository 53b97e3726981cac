"""The job queue (ui/job_queue.py): order and persistence in ``<outputs>/queue.json``, a job that was running when
the app died comes back "interrupted" (never re-run silently), the runner starts jobs one after another through the
real RunController, a failed job does not block the next, Stop pauses the queue; validation at add time through the
app's own handlers; two tiny SD1.5 runs queued and trained in a fresh process; and the queue driven in a real
browser (kept across a page reload)."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from core.config import AppConfig
from core.events import RunFailed
from core.settings import Settings, SettingsError, save_settings
from ui.job_queue import (DONE, FAILED, INTERRUPTED, QUEUE_FILE, RUNNING, STOPPED, WAITING, JobQueue, QueueError,
                          QueueRunner, table_rows)
from ui.run_state import RunController

ROOT = Path(__file__).resolve().parent.parent


def _config(tmp_path: Path) -> AppConfig:
    for d in ("models", "datasets", "outputs", "presets"):
        (tmp_path / d).mkdir(exist_ok=True)
    return AppConfig(models_dir=str(tmp_path / "models"), datasets_dir=str(tmp_path / "datasets"),
                     outputs_dir=str(tmp_path / "outputs"), presets_dir=str(tmp_path / "presets"))


def _settings(name: str, **values) -> Settings:
    """Settings that pass Start's checks (the paths are not read until a real run starts)."""
    s = Settings()
    s.dataset.path, s.model.model_path, s.saving.output_name = "images", "some-model", name
    for dotted, value in values.items():
        section, field = dotted.split("__")
        setattr(getattr(s, section), field, value)
    return s


def _labels(queue: JobQueue) -> list[str]:
    return [j.label for j in queue.jobs()]


def _wait_until(condition, timeout_s: float = 20, what: str = "condition") -> None:
    deadline = time.time() + timeout_s
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# -- order and persistence ------------------------------------------------------------------------------------------

def test_order_survives_a_reload_and_a_running_job_comes_back_interrupted(tmp_path):
    config = _config(tmp_path)
    path = config.path("outputs_dir") / QUEUE_FILE
    queue = JobQueue.for_config(config)
    assert queue.path == path and not path.exists()     # nothing written before the first job
    a, b, c = (queue.add(_settings(n)) for n in ("a", "b", "c"))
    assert _labels(queue) == ["a", "b", "c"] and all(j.state == WAITING for j in queue.jobs())
    assert queue.move(c.id, -1) and _labels(queue) == ["a", "c", "b"]
    assert not queue.move(a.id, -1), "the first job cannot move up"
    assert not queue.move(b.id, +1), "the last job cannot move down"
    assert queue.move(a.id, +1) and _labels(queue) == ["c", "a", "b"]
    assert queue.remove(b.id).label == "b" and _labels(queue) == ["c", "a"]
    d = queue.add(_settings("d", network__rank=32))

    # a broken job is refused with Start's messages and changes nothing
    before = path.read_text()
    with pytest.raises(SettingsError) as err:
        queue.add(_settings("e", model__model_path=""))
    assert "model.model_path" in str(err.value)
    with pytest.raises(SettingsError) as err:
        queue.add(_settings("f", network__target="full", network__algorithm="lora"))
    assert "network.target" in str(err.value)
    assert path.read_text() == before and _labels(queue) == ["c", "a", "d"]

    again = JobQueue(path)
    assert _labels(again) == ["c", "a", "d"]
    assert [j.id for j in again.jobs()] == [c.id, a.id, d.id]
    assert again.get(d.id).settings == _settings("d", network__rank=32).to_dict()
    assert not again.paused and again.problem is None
    assert not list(path.parent.glob(".*.tmp")), "atomic writes leave no temp file behind"

    # a job that ran is no longer movable or removable; only waiting ones are
    queue.mark_running(c.id)
    with pytest.raises(QueueError):
        queue.remove(c.id)
    with pytest.raises(QueueError):
        queue.move(c.id, +1)
    assert not queue.move(a.id, -1), "a waiting job moves past waiting jobs only"
    assert json.loads(path.read_text())["jobs"][0]["state"] == RUNNING

    # the app died during c: on load it is interrupted, the queue paused, nothing re-run; the hint names the last
    # state folder c saved
    for step in ("000010", "000020"):
        (config.path("outputs_dir") / "c" / f"c-state-{step}").mkdir(parents=True)
        time.sleep(0.02)
    after_crash = JobQueue(path, config)
    job = after_crash.get(c.id)
    assert job.state == INTERRUPTED and "Re-queue" in job.status and after_crash.paused
    assert str(config.path("outputs_dir").resolve() / "c" / "c-state-000020") in job.status
    assert after_crash.next_waiting().id == a.id
    assert json.loads(path.read_text())["jobs"][0]["state"] == INTERRUPTED
    assert JobQueue(path).get(c.id).state == INTERRUPTED

    copy = after_crash.requeue(c.id)
    assert _labels(after_crash) == ["c", "a", "d", "c"] and copy.state == WAITING
    assert copy.settings == job.settings and copy.id != c.id
    assert after_crash.clear_finished() == 1
    assert [j.id for j in JobQueue(path).jobs()] == [a.id, d.id, copy.id]


def test_an_unreadable_queue_file_is_set_aside_not_overwritten(tmp_path):
    config = _config(tmp_path)
    path = config.path("outputs_dir") / QUEUE_FILE
    path.write_text('{"jobs": [{"id": "x"', encoding="utf-8")
    queue = JobQueue(path)
    assert queue.jobs() == [] and "could not be read" in queue.problem
    aside = path.with_name(QUEUE_FILE + ".unreadable")
    assert aside.read_text() == '{"jobs": [{"id": "x"'
    queue.add(_settings("a"))
    assert aside.read_text() == '{"jobs": [{"id": "x"'
    assert _labels(JobQueue(path)) == ["a"]


# -- the runner, with a stand-in train_fn (the order and the states are the point here) -------------------------------

class FakeTrain:
    """Records the order of the runs and whether two ever overlapped; 'fail*' outputs raise, 'hold*' outputs train
    until Stop."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.order: list[str] = []
        self.active = 0
        self.overlapped = False
        self.lock = threading.Lock()

    def __call__(self, settings, on_event=None, stop_event=None, config=None):
        name = settings.saving.output_name
        with self.lock:
            self.order.append(name)
            self.active += 1
            self.overlapped |= self.active > 1
        try:
            on_event({"type": "status", "message": f"Training {name}"})
            on_event({"type": "progress", "step": 1, "total_steps": 2, "loss": 0.5})
            if name.startswith("fail"):
                raise RunFailed(f"{name}: the loss became NaN")
            if name.startswith("hold"):
                stop_event.wait(20)
            else:
                time.sleep(0.2)
            final = str(self.tmp_path / f"{name}.safetensors")
            on_event({"type": "done", "outputs": [final], "final": final, "stopped": stop_event.is_set()})
        finally:
            with self.lock:
                self.active -= 1


@pytest.fixture
def runner_setup(tmp_path):
    fake = FakeTrain(tmp_path)
    queue = JobQueue.for_config(_config(tmp_path))
    runner = QueueRunner(queue, RunController(train_fn=fake), poll_s=0.05)
    yield queue, runner, fake
    runner.close()
    runner.controller.stop()
    runner.controller.wait(10)


def test_the_runner_runs_jobs_in_queue_order_and_a_failed_job_does_not_block_the_next(runner_setup, tmp_path):
    queue, runner, fake = runner_setup
    queue.set_paused(True)             # queue them all first, then reorder: the order run is the queue's
    jobs = {n: queue.add(_settings(n)) for n in ("first", "fail_second", "third", "fourth")}
    queue.move(jobs["fourth"].id, -1)
    runner.start()
    time.sleep(0.3)
    assert fake.order == [], "a paused queue starts nothing"
    runner.resume()
    _wait_until(lambda: all(j.state not in (WAITING, RUNNING) for j in queue.jobs()), what="all jobs")
    assert fake.order == ["first", "fail_second", "fourth", "third"]
    assert not fake.overlapped, "never two runs at once"
    by_name = {j.label: j for j in queue.jobs()}
    assert [by_name[n].state for n in ("first", "fail_second", "fourth", "third")] == [DONE, FAILED, DONE, DONE]
    assert by_name["fail_second"].error == "fail_second: the loss became NaN"
    assert by_name["first"].final == str(tmp_path / "first.safetensors")
    assert by_name["first"].started_at <= by_name["first"].finished_at <= by_name["fail_second"].started_at
    log = Path(by_name["first"].log_path).read_text()
    assert "Training first" in log and "Finished" in log
    assert "the loss became NaN" in Path(by_name["fail_second"].log_path).read_text()
    assert not queue.paused

    # the table the page shows, and the same after a restart (read from queue.json by a new object)
    rows = table_rows(JobQueue(queue.path).jobs())
    assert [r[1] for r in rows] == ["first", "fail_second", "fourth", "third"]
    assert rows[0][2] == "✓ done" and rows[0][5] == str(tmp_path / "first.safetensors")
    assert rows[1][2] == "✗ failed" and rows[1][5] == "fail_second: the loss became NaN"
    assert rows[0][6] == by_name["first"].log_path


def test_stop_ends_the_current_job_only_and_pauses_the_queue(runner_setup):
    queue, runner, fake = runner_setup
    held = queue.add(_settings("hold_long"))
    after = queue.add(_settings("after"))
    runner.start()
    _wait_until(lambda: queue.get(held.id).state == RUNNING and fake.order == ["hold_long"], what="the first job")
    assert runner.controller.running and queue.get(after.id).state == WAITING
    runner.controller.stop()          # what the Run tab's Stop does
    _wait_until(lambda: queue.get(held.id).state == STOPPED, what="the stopped job")
    assert queue.paused and queue.get(held.id).final.endswith("hold_long.safetensors")
    time.sleep(0.4)
    assert queue.get(after.id).state == WAITING and fake.order == ["hold_long"], "paused after a stopped job"
    assert JobQueue(queue.path).paused, "the pause is kept in queue.json"
    runner.resume()
    _wait_until(lambda: queue.get(after.id).state == DONE, what="the next job after Run queue")
    assert fake.order == ["hold_long", "after"]


def test_a_job_whose_settings_no_longer_validate_fails_without_starting(runner_setup):
    queue, runner, fake = runner_setup
    queue.set_paused(True)
    bad = queue.add(_settings("renamed"))
    good = queue.add(_settings("good"))
    data = json.loads(queue.path.read_text())
    data["jobs"][0]["settings"]["network"]["rank_that_was_renamed"] = 4   # a setting the app no longer knows
    queue.path.write_text(json.dumps(data))
    queue = JobQueue(queue.path)
    runner.queue = queue
    runner.resume()
    runner.start()
    _wait_until(lambda: queue.get(good.id).state == DONE, what="the good job")
    assert queue.get(bad.id).state == FAILED and "rank_that_was_renamed" in queue.get(bad.id).error
    assert fake.order == ["good"]


def test_the_run_tabs_stop_names_the_queue_and_pauses_it(tmp_path):
    """Through the Run tab's own Stop handlers, on an app whose queue runs (a stand-in train_fn)."""
    from tests.test_ui_sync import handler
    from ui.app import build_app
    fake = FakeTrain(tmp_path)
    demo = build_app(_config(tmp_path), controller=RunController(train_fn=fake))
    queue = demo.studio_queue.queue
    demo.studio_queue.poll_s = 0.05
    demo.studio_queue.start()
    try:
        held, after = queue.add(_settings("hold_in_app")), queue.add(_settings("after_in_app"))
        _wait_until(lambda: queue.get(held.id).state == RUNNING, what="the first job")
        _row, question, _notice = handler(demo, "run-stop", "click").fn()
        assert "Stop the run 'hold_in_app'" in question and "The queue pauses after it" in question
        handler(demo, "run-stop-confirm", "click").fn()
        _wait_until(lambda: queue.get(held.id).state == STOPPED, what="the stopped job")
        time.sleep(0.3)
        assert queue.paused and queue.get(after.id).state == WAITING and fake.order == ["hold_in_app"]
        view = demo.studio_queue_handlers["view"](None)
        assert "Paused." in view[1] and list(view[2]["State"]) == ["■ stopped", "… waiting"]
    finally:
        demo.studio_queue.close()
        demo.studio_controller.stop()
        demo.studio_controller.wait(10)


# -- the app's handlers: the same checks as Start at add time -------------------------------------------------------

def test_the_app_refuses_a_broken_job_when_it_is_added(tmp_path):
    from tests.test_ui_sync import handler
    from ui.app import build_app
    from ui.schema_ui import dotted_from_elem_id, settings_to_values
    config = _config(tmp_path)
    demo = build_app(config)
    h = demo.studio_queue_handlers
    queue = demo.studio_queue.queue
    # the settings in the order the button sends them (after the chosen job)
    fn = handler(demo, "queue-add-current", "click")
    names = [dotted_from_elem_id(c.elem_id) for c in fn.inputs[1:]]

    values = settings_to_values(Settings())
    values["network.rank"] = 0
    out = h["add_current"](None, *[values[n] for n in names])
    assert out[0].startswith("✗ **Invalid settings**") and "`network.rank` (**Network → Rank (dim)**)" in out[0]
    values = settings_to_values(Settings())            # valid values, but no dataset or model: Start refuses it
    out = h["add_current"](None, *[values[n] for n in names])
    assert out[0].startswith("✗ **Not added: fix these settings first**")
    assert "`dataset.path`" in out[0] and "`model.model_path`" in out[0] and "Traceback" not in out[0]
    out = h["add_preset"]("sd15_lora", None)            # the shipped example names no dataset
    assert "Preset sd15_lora not added" in out[0] and "dataset.path" in out[0]
    assert queue.jobs() == [] and not queue.path.exists()

    values = settings_to_values(_settings("from_the_page"))
    out = h["add_current"](None, *[values[n] for n in names])
    assert out[0].startswith("✓ Added **from_the_page**")
    save_settings(_settings("portrait_v2"), config.path("presets_dir") / "portrait.json")
    out = h["add_preset"]("portrait", None)
    assert out[0].startswith("✓ Added **portrait → portrait_v2**")
    assert _labels(JobQueue(queue.path)) == ["from_the_page", "portrait → portrait_v2"]
    table = out[3]
    assert list(table["Job"]) == ["from_the_page", "portrait → portrait_v2"]
    second = queue.jobs()[1].id
    out = h["up"](second)
    assert "Moved" in out[0] and list(out[3]["Job"]) == ["portrait → portrait_v2", "from_the_page"]
    assert out[4]["value"] == second, "the moved job stays chosen"
    assert h["remove"](None)[0].startswith("✗ Choose a job")
    assert not demo.studio_queue._thread, "an app that is only built runs no queued job"


# -- the real trainer through the queue, in a fresh process ----------------------------------------------------------

CHILD_SCRIPT = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from core.config import load_config
from core.settings import load_settings
from ui.job_queue import JobQueue, QueueRunner
from ui.run_state import RunController
config = load_config(sys.argv[2])
queue = JobQueue.for_config(config)
for path in sys.argv[3:]:
    queue.add(load_settings(path))
runner = QueueRunner(queue, RunController(config), poll_s=0.2)
runner.start()
deadline = time.time() + 500
while any(j.state in ("waiting", "running") for j in queue.jobs()) and time.time() < deadline:
    time.sleep(0.2)
runner.close()
print("QUEUE_RESULT " + json.dumps([{"label": j.label, "state": j.state, "final": j.final, "error": j.error,
                                      "started_at": j.started_at, "finished_at": j.finished_at,
                                      "log_path": j.log_path} for j in queue.jobs()]))
"""


@pytest.mark.timeout(900)
def test_two_queued_tiny_sd15_runs_train_one_after_another_in_a_fresh_process(tmp_path):
    from safetensors.torch import load_file

    from tests.tiny_models import build_tiny_dataset, build_tiny_sd15, tiny_train_settings
    model = build_tiny_sd15(tmp_path / "model" / "tiny-sd15", "diffusers")
    data = build_tiny_dataset(tmp_path / "data", n=4)
    paths = []
    for name in ("queued_first", "queued_second"):
        s, config = tiny_train_settings("sd15", {"model.model_path": str(model)}, data, tmp_path / "run",
                                        schedule__max_train_steps=3, optimizer__learning_rate=1e-2,
                                        saving__output_name=name, saving__save_state=False)
        save_settings(s, tmp_path / f"{name}.json")
        paths.append(str(tmp_path / f"{name}.json"))
    (tmp_path / "config.json").write_text(config.model_dump_json(indent=2), encoding="utf-8")

    proc = subprocess.run([sys.executable, "-c", CHILD_SCRIPT, str(ROOT), str(tmp_path / "config.json"), *paths],
                          cwd=str(ROOT), capture_output=True, text=True, timeout=800)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("QUEUE_RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    jobs = json.loads(lines[-1].split(" ", 1)[1])
    assert [j["label"] for j in jobs] == ["queued_first", "queued_second"]
    assert [j["state"] for j in jobs] == [DONE, DONE], jobs
    assert jobs[0]["finished_at"] <= jobs[1]["started_at"], "the second run started after the first ended"
    outputs = config.path("outputs_dir")
    for job in jobs:
        final = Path(job["final"])
        assert final.suffix == ".safetensors" and final.is_file() and outputs in final.parents
        assert final.parent.name == job["label"]
        ups = [t for k, t in load_file(str(final)).items() if k.endswith("lora_up.weight")]
        assert ups and any(float(t.float().norm()) > 0 for t in ups), "the adapter was trained"
        assert "Finished" in Path(job["log_path"]).read_text()
    # the queue file the child left behind reads back the same in this process
    assert [(j.label, j.state, j.final) for j in JobQueue.for_config(config).jobs()] == \
        [(j["label"], j["state"], j["final"]) for j in jobs]


# -- the queue in a real browser -------------------------------------------------------------------------------------

CHROMIUM = Path("/usr/bin/chromium")


def test_the_queue_in_the_browser_keeps_its_order_across_a_reload(tmp_path):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    from tests.test_ui_browser import CHROMIUM_ARGS, expect_text, open_tab
    from ui.app import launch
    config = _config(tmp_path)
    config = config.model_copy(update={"host": "127.0.0.1", "port": 0,
                                       "training_defaults": str(ROOT / "training.json")})
    for preset, name in (("job-one", "job_one"), ("job-two", "job_two")):
        save_settings(_settings(name), config.path("presets_dir") / f"{preset}.json")
    demo = launch(config, prevent_thread_lock=True, quiet=True)
    queue = demo.studio_queue.queue
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 800})
                page.set_default_timeout(20_000)
                page.goto(demo.local_url)
                page.wait_for_selector("#setting-dataset-path")
                open_tab(page, "Run")
                start = page.locator("#run-start").bounding_box()
                assert start["y"] + start["height"] < 800, "Start stays at the top with the queue below it"
                _open_queue(page)
                page.locator("#queue-pause").click()     # build the queue first: nothing may start meanwhile
                expect_text(page.locator("#queue-summary"), "Paused.")

                page.locator("#queue-add-current").click()   # the defaults: no dataset, no model
                expect_text(page.locator("#queue-notice"), "dataset.path")

                name_box = page.locator("#preset-name input").first
                name_box.fill("job-one")
                name_box.press("Enter")
                page.locator("#preset-load").click()
                expect_text(page.locator("#preset-status"), "Loaded preset")
                page.locator("#queue-add-current").click()
                expect_text(page.locator("#queue-notice"), "Added job_one")
                choose_dropdown_in(page, "#queue-preset", "job-two")
                page.locator("#queue-add-preset").click()
                expect_text(page.locator("#queue-notice"), "Added job-two → job_two")
                assert _table_jobs(page) == ["job_one", "job-two → job_two"]

                _table_cell(page, row=1, column=1).click()     # choose the second job by its row
                page.wait_for_function("document.querySelector('#queue-job input').value.startsWith('2.')")
                page.locator("#queue-up").click()
                expect_text(page.locator("#queue-notice"), "Moved")
                _wait_for_table(page, ["job-two → job_two", "job_one"])
                assert _labels(JobQueue(queue.path)) == ["job-two → job_two", "job_one"]

                page.reload()
                page.wait_for_selector("#setting-dataset-path")
                open_tab(page, "Run")
                _open_queue(page)
                _wait_for_table(page, ["job-two → job_two", "job_one"])
                expect_text(page.locator("#queue-summary"), "Paused. Press Run queue")
                assert "Queue (paused): 2 waiting" in page.locator("#queue").inner_text()
                assert not demo.studio_controller.running
            finally:
                browser.close()
    finally:
        demo.studio_queue.close()
        demo.close()


def _open_queue(page) -> None:
    if not page.locator("#queue-table").is_visible():
        page.locator("#queue").get_by_text("Queue", exact=False).first.click()
        page.wait_for_timeout(300)
    page.locator("#queue-table").wait_for(state="visible")


def choose_dropdown_in(page, selector: str, label: str) -> None:
    page.locator(f"{selector} input").first.click()
    page.get_by_role("option", name=label, exact=True).click()
    page.wait_for_timeout(200)


def _table_cell(page, row: int, column: int):
    return page.locator(f"#queue-table [data-testid='cell-{row}-{column}']")


def _table_jobs(page) -> list[str]:
    """The Job column as shown (Gradio draws the rows as a virtual grid of cells)."""
    rows = page.locator("#queue-table [role=row].virtual-row").count()
    return [_table_cell(page, i, 1).inner_text().strip() for i in range(rows)]


def _wait_for_table(page, expected: list[str], timeout_s: float = 20) -> None:
    deadline = time.time() + timeout_s
    while _table_jobs(page) != expected:
        if time.time() > deadline:
            raise AssertionError(f"the queue table shows {_table_jobs(page)}, not {expected}")
        time.sleep(0.2)
