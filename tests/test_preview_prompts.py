"""Preview prompts in sd-scripts' syntax (core.prompts): parsing, the messages for bad lines, and previews that
follow each line's options in a training run (tiny SD1.5)."""
from __future__ import annotations

import pytest
from PIL import Image

import core
from core.prompts import PreviewPrompt, parse_line, parse_prompts, prompt_problems, split_options
from core.settings import Settings, check_consistency
from tests.tiny_models import build_tiny_dataset, build_tiny_sd15, tiny_train_settings


def test_a_line_gives_its_prompt_and_options():
    assert parse_line("a photo of sks dog --n blurry, lowres --w 768 --h 512 --d 42 --s 28 --l 6.5") == PreviewPrompt(
        "a photo of sks dog", {"negative_prompt": "blurry, lowres", "width": 768, "height": 512, "seed": 42,
                               "steps": 28, "guidance_scale": 6.5})
    assert parse_line("  just a prompt  ") == PreviewPrompt("just a prompt", {})
    # "--" inside the prompt text is not an option unless a known-looking name follows it as a word
    assert split_options("well--known artist --l 5") == ("well--known artist", [("l", "5")])
    assert [p.prompt for p in parse_prompts("# comment\n\na cat\n  a dog --s 4\n")] == ["a cat", "a dog"]


@pytest.mark.parametrize("line,why", [
    ("a cat --ss euler_a", "unknown option --ss"), ("a cat --w 770", "not a multiple of 8"),
    ("a cat --s many", "needs a whole number"), ("a cat --l 99", "outside 0 … 50"), ("--w 512", "no prompt"),
    ("a cat --d -1", "outside 0")])
def test_bad_lines_say_what_is_wrong(line, why):
    with pytest.raises(ValueError, match=why):
        parse_line(line)


def test_bad_lines_are_refused_before_the_run_with_their_line_number():
    s = Settings()
    s.sampling.prompts = "a cat\n# fine\na dog --x 3\n"
    problems = check_consistency(s)
    assert any(p.startswith("sampling.prompts line 3 (a dog --x 3): unknown option --x") and
               p.endswith("(Sampling → Preview prompts)") for p in problems), problems
    assert prompt_problems("a cat --w 512\n") == []


def test_previews_follow_each_lines_options(tmp_path_factory, tmp_path):
    root = tmp_path_factory.mktemp("prompts")
    data, model = build_tiny_dataset(root / "data", n=2), build_tiny_sd15(root / "sd15")
    prompts = "a red square --w 96 --h 64 --d 7\na red square --w 96 --h 64 --d 7\na red square --d 8\na blue circle"
    s, config = tiny_train_settings("sd15", {"model.model_path": str(model)}, data, tmp_path,
                                    schedule__max_train_steps=1, sampling__sample_every_n_steps=1,
                                    sampling__prompts=prompts, sampling__steps=2)
    events = []
    result = core.train(s, on_event=events.append, config=config)
    sample = [e for e in events if e["type"] == "sample"][-1]
    assert sample["prompts"] == ["a red square", "a red square", "a red square", "a blue circle"]
    images = [Image.open(p) for p in sample["paths"]]
    assert [im.size for im in images] == [(96, 64), (96, 64), (64, 64), (64, 64)]
    same_seed = [im.tobytes() for im in images[:2]]
    assert same_seed[0] == same_seed[1]                                   # --d 7 on both lines
    assert images[2].tobytes() != Image.open(sample["paths"][3]).tobytes()
    assert result.steps == 1
