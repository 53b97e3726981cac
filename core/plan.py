"""The memory/speed plan: a pure function of the hardware, the chosen family and the user's overrides.

Every "auto" setting is decided here, with the reason, so the UI can show what was chosen and why and
the user can override any of it."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Plan:
    device: str                      # "cuda" or "cpu"
    mixed_precision: str             # "bf16" | "fp16" | "no"
    tf32: bool
    gradient_checkpointing: bool
    cache_text_encoder_outputs: bool
    compile: str = "off"             # "off" | "regional"
    reasons: list[str] = field(default_factory=list)

    @property
    def weight_dtype(self) -> torch.dtype:
        """dtype of the frozen base weights."""
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.mixed_precision, torch.float32)

    def summary(self) -> str:
        lines = [f"device {self.device}, precision {self.mixed_precision}, TF32 {'on' if self.tf32 else 'off'}, "
                 f"gradient checkpointing {'on' if self.gradient_checkpointing else 'off'}, text-encoder cache "
                 f"{'on' if self.cache_text_encoder_outputs else 'off'}, compile {self.compile}"]
        return "\n".join(lines + [f"  · {r}" for r in self.reasons])


def text_cache_blockers(settings) -> list[str]:
    """Why text-encoder outputs cannot be cached for this run (empty when they can)."""
    out = []
    if settings.network.train_text_encoder:
        out.append("the text encoder is trained")
    if settings.dataset.shuffle_caption:
        out.append("captions are shuffled every step")
    return out


def make_plan(profile, settings, arch) -> Plan:
    """``arch`` is the chosen family's plug-in: its ``checkpointing_below_gb`` says when the denoiser needs
    gradient checkpointing at batch 1."""
    from core.hardware import choose_precision, choose_tf32
    m = settings.memory
    gpu = profile.gpus[0] if profile.gpus else None
    reasons = []
    precision = choose_precision(profile, m.mixed_precision)
    if m.mixed_precision == "auto":
        reasons.append(f"precision {precision}: " + ("no GPU, fp32 on the CPU" if gpu is None else
                       f"{gpu.name} {'supports' if precision == 'bf16' else 'lacks'} bf16"))
    tf32 = choose_tf32(profile, m.tf32)
    if m.gradient_checkpointing == "auto":
        limit = arch.checkpointing_below_gb
        checkpointing = gpu is not None and gpu.total_vram_gb < limit
        reasons.append(f"gradient checkpointing {'on' if checkpointing else 'off'}: " +
                       ("CPU run, memory is not the limit" if gpu is None else
                        f"{gpu.total_vram_gb:.0f} GB VRAM {'<' if checkpointing else '≥'} {limit:.0f} GB"))
    else:
        checkpointing = m.gradient_checkpointing == "on"
    blockers = text_cache_blockers(settings)
    if m.cache_text_encoder_outputs == "on" and blockers:
        raise ValueError("memory.cache_text_encoder_outputs is 'on' but cannot be used because "
                         + " and ".join(blockers) + "; set it to 'auto' or 'off'")
    cache_te = m.cache_text_encoder_outputs != "off" and not blockers
    if m.cache_text_encoder_outputs == "auto":
        reasons.append("text-encoder outputs " + ("cached once, encoders leave the GPU" if cache_te else
                                                  "not cached: " + " and ".join(blockers)))
    if m.compile == "auto":
        compile_how = "regional" if gpu is not None and triton_available() else "off"
        reasons.append("compile " + ("regional: CUDA and Triton present" if compile_how == "regional" else
                                     "off: " + ("no GPU" if gpu is None else "Triton is not installed")))
    else:
        compile_how = m.compile
    return Plan(device="cuda" if gpu is not None else "cpu", mixed_precision=precision, tf32=tf32,
                gradient_checkpointing=checkpointing, cache_text_encoder_outputs=cache_te, compile=compile_how,
                reasons=reasons)


def triton_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("triton") is not None
