"""Preview prompts in sd-scripts' syntax: one prompt per line, each optionally followed by its own options,

    a photo of sks dog --n blurry, lowres --w 768 --h 512 --d 42 --s 28 --l 6.5

``--n`` negative prompt, ``--w`` / ``--h`` size, ``--d`` seed, ``--s`` steps, ``--l`` guidance (CFG) scale; an
option left out takes the Sampling tab's value.  Blank lines and lines starting with ``#`` are skipped.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

# option → (sampling setting it overrides, type, smallest, largest)
OPTIONS: dict[str, tuple[str, type, float, float]] = {
    "n": ("negative_prompt", str, 0, 0), "w": ("width", int, 64, 4096), "h": ("height", int, 64, 4096),
    "d": ("seed", int, 0, 2**32 - 1), "s": ("steps", int, 1, 200), "l": ("guidance_scale", float, 0.0, 50.0),
}
_OPTION = re.compile(r"\s--([a-z]+)(?=\s|$)")


@dataclass(frozen=True)
class PreviewPrompt:
    prompt: str
    #: sampling setting → value, for the options the line gives
    overrides: dict[str, Any] = field(default_factory=dict)


def split_options(line: str) -> tuple[str, list[tuple[str, str]]]:
    """``"text --w 768 --n a b"`` → ``("text", [("w", "768"), ("n", "a b")])``: the prompt and its options in order,
    whatever their names."""
    parts = _OPTION.split(" " + line.strip())
    return parts[0].strip(), [(parts[i], parts[i + 1].strip()) for i in range(1, len(parts), 2)]


def parse_line(line: str) -> PreviewPrompt:
    """One prompt line; ValueError (saying which option and why) for an unknown option or a bad value."""
    prompt, options = split_options(line)
    if not prompt:
        raise ValueError("the line has options but no prompt")
    overrides: dict[str, Any] = {}
    for name, text in options:
        if name not in OPTIONS:
            raise ValueError(f"unknown option --{name} (known: {' '.join('--' + o for o in OPTIONS)})")
        setting, kind, lo, hi = OPTIONS[name]
        if kind is str:
            overrides[setting] = text
            continue
        try:
            value = kind(text) if kind is float else int(text)
        except ValueError:
            raise ValueError(f"--{name} needs a {'number' if kind is float else 'whole number'}, not {text!r}") from None
        if not lo <= value <= hi:
            raise ValueError(f"--{name} {text} is outside {lo:g} … {hi:g}")
        if name in ("w", "h") and value % 8:
            raise ValueError(f"--{name} {value} is not a multiple of 8")
        overrides[setting] = value
    return PreviewPrompt(prompt, overrides)


def _lines(text: str) -> list[tuple[int, str]]:
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)
            if line.strip() and not line.strip().startswith("#")]


def parse_prompts(text: str) -> list[PreviewPrompt]:
    """Every prompt of the Sampling tab's text (call :func:`prompt_problems` first for readable errors)."""
    return [parse_line(line) for _, line in _lines(text)]


def prompt_problems(text: str) -> list[str]:
    """One message per bad line, saying where it is and what to change."""
    out = []
    for n, line in _lines(text):
        try:
            parse_line(line)
        except ValueError as exc:
            out.append(f"sampling.prompts line {n} ({line[:40]}{'…' if len(line) > 40 else ''}): {exc} "
                       "(Sampling → Preview prompts)")
    return out


__all__ = ["PreviewPrompt", "OPTIONS", "split_options", "parse_line", "parse_prompts", "prompt_problems"]
