"""The Tools tab: adapter summary, merge into a base model, resize, extract.  No logic here: every button
calls ``core.tools`` and shows its result or its error as text (never a traceback).

Paths may be absolute or relative to the models folder (base models) and the outputs folder (adapters,
results); the handlers are plain functions so tests and scripts can call them directly."""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Iterable, Sequence

import gradio as gr

from core import tools
from core.config import AppConfig, confine
from ui import warmup

DTYPES = ("fp16", "bf16", "fp32")


def _resolve(text: str, dirs: Iterable[Path] = (), *, must_exist: bool = True, roots: Sequence[Path] = (),
             what: str = "path") -> Path:
    """A Tools path: absolute, or relative to the first of ``dirs`` that has it (new files: the last).  With
    ``roots`` (the app's folders, always given in the app) it must resolve inside one of them."""
    text = (text or "").strip().strip('"')
    if not text:
        raise ValueError(f"{what}: the path is empty")
    p = Path(text).expanduser()
    if not p.is_absolute():
        dirs = [Path(d) for d in dirs if d]
        found = [d / p for d in dirs if (d / p).exists()] if must_exist else []
        p = found[0] if found else (dirs[-1] / p if dirs else p)
    if roots:
        confine(p, list(roots), what, text)
    return p


def _error(e: BaseException) -> str:
    return f"✗ Error: {e}" if str(e) else f"✗ Error: {type(e).__name__}"


def _run(fn):
    warmup.wait()  # the tools load models: not while the start-up warm-up imports the same libraries
    try:
        return fn()
    except Exception as e:  # shown as text in the UI, never as a traceback
        return _error(e)


def parse_adapters(text: str, dirs: Iterable[Path] = (), roots: Sequence[Path] = ()) -> list[tuple[Path, float]]:
    """One adapter per line (or ``;``-separated): ``path`` or ``path:weight`` / ``path,weight``."""
    out = []
    for line in (text or "").replace(";", "\n").splitlines():
        line = line.strip()
        if not line:
            continue
        path, weight = line, 1.0
        for sep in (",", ":"):
            head, s, tail = line.rpartition(sep)
            if s and head:
                try:
                    weight = float(tail)
                    path = head.strip()
                    break
                except ValueError:
                    continue
        out.append((_resolve(path, dirs, roots=roots, what="Adapters"), weight))
    if not out:
        raise ValueError("list at least one adapter file (one per line, optionally path:weight)")
    return out


def summary_handler(path: str, dirs: Iterable[Path] = (), roots: Sequence[Path] = ()) -> str:
    return _run(lambda: tools.format_summary(tools.adapter_summary(_resolve(path, dirs, roots=roots,
                                                                            what="Adapter file"))))


def merge_handler(arch_id: str, base: str, adapters: str, out: str, config_dir: str = "", save_dtype: str = "fp16",
                  model_dirs: Iterable[Path] = (), dirs: Iterable[Path] = (), roots: Sequence[Path] = ()) -> str:
    def go():
        written = tools.merge_adapters(
            arch_id, _resolve(base, model_dirs, roots=roots, what="Base model"),
            parse_adapters(adapters, dirs, roots), _resolve(out, dirs, must_exist=False, roots=roots,
                                                            what="Output checkpoint"),
            _resolve(config_dir, model_dirs, roots=roots, what="Config folder") if (config_dir or "").strip()
            else None, save_dtype)
        return f"✓ merged checkpoint written: {written}"
    return _run(go)


def resize_handler(path: str, out: str, mode: str, value: str, dirs: Iterable[Path] = (),
                   roots: Sequence[Path] = ()) -> str:
    def go():
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"value must be a number, not {value!r}") from None
        _, report = tools.resize_lora(_resolve(path, dirs, roots=roots, what="Adapter file"),
                                      _resolve(out, dirs, must_exist=False, roots=roots, what="Output file"), mode, v)
        return "✓ " + tools.format_resize_report(report)
    return _run(go)


def extract_handler(arch_id: str, base: str, tuned: str, out: str, rank: str, conv_rank: str = "",
                    config_dir: str = "", model_dirs: Iterable[Path] = (), dirs: Iterable[Path] = (),
                    roots: Sequence[Path] = ()) -> str:
    def go():
        try:
            r = int(float(rank))
            c = int(float(conv_rank)) if str(conv_rank or "").strip() else None
        except (TypeError, ValueError):
            raise ValueError("rank and conv rank must be whole numbers") from None
        written = tools.extract_lora(
            arch_id, _resolve(base, model_dirs, roots=roots, what="Base model"),
            _resolve(tuned, model_dirs, roots=roots, what="Fine-tuned model"),
            _resolve(out, dirs, must_exist=False, roots=roots, what="Output LoRA"), r,
            _resolve(config_dir, model_dirs, roots=roots, what="Config folder") if (config_dir or "").strip()
            else None, conv_rank=c)
        return f"✓ LoRA written: {written}\n" + tools.format_summary(tools.adapter_summary(written))
    return _run(go)


# wide enough for the longest family name ("FLUX.2 klein base 9B (undistilled)") to stay clear of the arrow
FAMILY_WIDTH = {"scale": 2, "min_width": 340}


def build_tools_tab(config: AppConfig) -> None:
    """Renders the tab's contents (call inside a ``gr.Tab``); every path stays inside ``config.roots()``."""
    import architectures
    arch_choices = [(label, arch_id) for arch_id, label in architectures.available().items()]
    # merging writes the family's whole original checkpoint: only the families that can write one
    merge_choices = [(cls.label, arch_id) for arch_id, cls in architectures.registry().items()
                     if cls.supports_full_checkpoint]
    model_dirs = [config.path("models_dir")]
    dirs = [config.path("models_dir"), config.path("outputs_dir")]  # outputs last: new files go there
    roots = config.roots()
    text = dict(lines=1, max_lines=1)

    gr.Markdown("Paths: absolute, or relative to the models folder (base models) / outputs folder "
                "(adapters and results). Existing files are never overwritten: a free name is used instead.")
    gr.Markdown("### Adapter summary")
    with gr.Row():
        s_path = gr.Textbox(label="Adapter file (.safetensors)", elem_id="tools-summary-path", scale=4, **text)
        s_btn = gr.Button("Inspect", elem_id="tools-summary-run", scale=1)
    s_out = gr.Textbox(label="Summary", lines=8, interactive=False, elem_id="tools-summary-out")
    s_btn.click(partial(summary_handler, dirs=dirs, roots=roots), [s_path], s_out)

    gr.Markdown("### Merge adapters into a base model")
    gr.Markdown("Writes the family's original single file. For SD3, SD3.5 and FLUX that is the transformer alone "
                "(a diffusers folder or a transformer file as the base; text encoders and VAE stay separate).")
    with gr.Row():
        m_arch = gr.Dropdown(merge_choices, value=merge_choices[0][1], label="Model family",
                             elem_id="tools-merge-arch", **FAMILY_WIDTH)
        m_base = gr.Textbox(label="Base model", elem_id="tools-merge-base", scale=3, **text)
        m_cfg = gr.Textbox(label="Config folder (optional)", elem_id="tools-merge-config", scale=2, **text)
    m_adapters = gr.Textbox(label="Adapters, one per line as path:weight", lines=3, elem_id="tools-merge-adapters")
    with gr.Row():
        m_out = gr.Textbox(label="Output checkpoint", elem_id="tools-merge-out", scale=3, **text)
        m_dtype = gr.Dropdown(list(DTYPES), value="fp16", label="Save precision", elem_id="tools-merge-dtype")
        m_btn = gr.Button("Merge", elem_id="tools-merge-run")
    m_res = gr.Textbox(label="Result", lines=2, interactive=False, elem_id="tools-merge-out-text")
    m_btn.click(partial(merge_handler, model_dirs=model_dirs, dirs=dirs, roots=roots),
                [m_arch, m_base, m_adapters, m_out, m_cfg, m_dtype], m_res)

    gr.Markdown("### Resize a LoRA / LoCon")
    with gr.Row():
        r_path = gr.Textbox(label="Adapter file", elem_id="tools-resize-path", scale=3, **text)
        r_out = gr.Textbox(label="Output file", elem_id="tools-resize-out", scale=3, **text)
    with gr.Row():
        r_mode = gr.Dropdown([("fixed rank", "fixed"), ("singular-value ratio", "sv_ratio"),
                              ("Frobenius energy kept", "sv_fro")], value="fixed", label="Mode",
                             elem_id="tools-resize-mode")
        r_value = gr.Textbox(value="8", label="Value (rank, ratio ≥ 1, or fraction ≤ 1)",
                             elem_id="tools-resize-value", **text)
        r_btn = gr.Button("Resize", elem_id="tools-resize-run")
    r_res = gr.Textbox(label="Report", lines=6, interactive=False, elem_id="tools-resize-out-text")
    r_btn.click(partial(resize_handler, dirs=dirs, roots=roots), [r_path, r_out, r_mode, r_value], r_res)

    gr.Markdown("### Extract a LoRA from two models")
    with gr.Row():
        e_arch = gr.Dropdown(arch_choices, value=arch_choices[0][1], label="Model family",
                             elem_id="tools-extract-arch", **FAMILY_WIDTH)
        e_base = gr.Textbox(label="Base model", elem_id="tools-extract-base", scale=3, **text)
        e_tuned = gr.Textbox(label="Fine-tuned model", elem_id="tools-extract-tuned", scale=3, **text)
    with gr.Row():
        e_out = gr.Textbox(label="Output LoRA", elem_id="tools-extract-out", scale=3, **text)
        e_rank = gr.Textbox(value="32", label="Rank", elem_id="tools-extract-rank", **text)
        e_conv = gr.Textbox(value="", label="Conv rank (empty: no k×k convs)", elem_id="tools-extract-conv", **text)
        e_cfg = gr.Textbox(label="Config folder (optional)", elem_id="tools-extract-config", scale=2, **text)
        e_btn = gr.Button("Extract", elem_id="tools-extract-run")
    e_res = gr.Textbox(label="Result", lines=6, interactive=False, elem_id="tools-extract-out-text")
    e_btn.click(partial(extract_handler, model_dirs=model_dirs, dirs=dirs, roots=roots),
                [e_arch, e_base, e_tuned, e_out, e_rank, e_conv, e_cfg], e_res)


__all__ = ["build_tools_tab", "summary_handler", "merge_handler", "resize_handler", "extract_handler",
           "parse_adapters"]
