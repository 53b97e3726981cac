"""The memory/speed plan: a pure function of the hardware, the chosen family, the run's shape and the user's
overrides.

Every "auto" setting is decided here, with the reason, so the UI can show what was chosen and why and
the user can override any of it.  An explicit choice is followed; one this machine cannot run raises a
ValueError naming the setting.  Memory: the plan walks from the fastest configuration to the most
memory-saving one and takes the first whose estimate (``core.estimate``) fits the budget:

    nothing → gradient checkpointing → 8-bit optimizer state → 8-bit base (qfloat8 / qint8)
    → + just enough swapped blocks → 4-bit base (nf4 / qint4) + just enough swapped blocks
    → + activation offload

Text encoders (for caching) go none → 8-bit → 4-bit → streamed layer by layer.  The batch size is never
changed.  When nothing fits, ``plan.fits`` is False and the reasons say by how much (the plan never raises
for that; the trainer may refuse)."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

#: kept free of the budget besides the CUDA context the estimate already counts
SAFETY_MARGIN_GB = 0.25
SAFETY_MARGIN_SHARE = 0.03
#: CPU memory left to the OS and the rest of the process when checking what is offloaded
RAM_RESERVE_GB = 4.0
EIGHT_BIT_OPTIMIZERS = ("AdamW", "Lion")


def precision_name(mixed_precision: str) -> str:
    """What people call it: accelerate's "no" mixed precision is fp32."""
    return "fp32" if mixed_precision == "no" else mixed_precision


class PlanRefusal(ValueError):
    """An explicit setting this machine cannot follow (the message names it)."""


@dataclass
class Plan:
    device: str                      # "cuda" or "cpu"
    mixed_precision: str             # "bf16" | "fp16" | "no"
    tf32: bool
    gradient_checkpointing: bool
    cache_text_encoder_outputs: bool
    compile: str = "off"             # "off" | "regional"
    reasons: list[str] = field(default_factory=list)
    attention: str = "default"       # SDPA backend: "flash" | "efficient" | "cudnn" | "math" | "default"
    blocks_to_swap: int = 0          # the denoiser's last N swappable blocks live in CPU memory
    quantize_base: str = "none"      # "none" | "qfloat8" | "qint8" | "qint4" | "nf4"
    quantize_text_encoder: str = "none"  # "none" | "qfloat8" | "qint8" | "qint4" | "nf4" | "stream"
    activation_offload: bool = False
    optimizer_8bit: bool = False
    channels_last: bool = False
    cuda_graphs: bool = False        # the step captured in a CUDA graph per bucket shape (core.cuda_graph)
    cpu_threads: int = 0             # 0: leave torch's default (GPU runs)
    estimate: object | None = None   # core.estimate.Estimate (None: could not be estimated)
    fits: bool = True
    budget_gb: float = 0.0           # what the estimate is compared with (VRAM, or RAM on the CPU)
    swappable_blocks: int = 0
    processes: int = 1               # core.distributed: each process runs this plan with the batch size
    strategy: str = "ddp"            # "ddp" | "fsdp" (core.fsdp: the full fine-tune's state sharded)
    global_batch: int = 0            # what one optimizer step takes over all processes

    @property
    def weight_dtype(self) -> torch.dtype:
        """dtype of the frozen base weights."""
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.mixed_precision, torch.float32)

    def brief(self) -> str:
        """The choices in one short line (bench tables, logs)."""
        parts = [precision_name(self.mixed_precision), f"attn {self.attention}"]
        if self.gradient_checkpointing:
            parts.append("checkpointing")
        if self.blocks_to_swap:
            parts.append(f"swap {self.blocks_to_swap}/{self.swappable_blocks}")
        if self.quantize_base != "none":
            parts.append(f"base {self.quantize_base}")
        if self.optimizer_8bit:
            parts.append("8-bit optimizer")
        if self.activation_offload:
            parts.append("activation offload")
        if self.quantize_text_encoder != "none":
            parts.append(f"text encoders {self.quantize_text_encoder}")
        if self.compile != "off":
            parts.append(f"compile {self.compile}")
        if self.cuda_graphs:
            parts.append("CUDA graphs")
        if self.device == "cpu":
            parts.append(f"{self.cpu_threads} threads")
        return ", ".join(parts)

    def summary(self) -> str:
        on = {True: "on", False: "off"}
        first = (f"device {self.device}, precision {precision_name(self.mixed_precision)}, TF32 {on[self.tf32]}, "
                 f"gradient checkpointing {on[self.gradient_checkpointing]}, text-encoder cache "
                 f"{on[self.cache_text_encoder_outputs]}, compile {self.compile}, attention {self.attention}")
        if self.device == "cuda":
            first += (f", blocks swapped {self.blocks_to_swap}/{self.swappable_blocks}, base "
                      f"{self.quantize_base if self.quantize_base != 'none' else 'not quantized'}, text encoders "
                      f"{self.quantize_text_encoder if self.quantize_text_encoder != 'none' else 'not quantized'}, "
                      f"8-bit optimizer {on[self.optimizer_8bit]}, activation offload {on[self.activation_offload]}, "
                      f"channels-last {on[self.channels_last]}, CUDA graphs {on[self.cuda_graphs]}")
        else:
            first += f", {self.cpu_threads} CPU threads"
        if self.processes > 1:
            first += (f", {self.processes} processes ({self.strategy.upper()}) with a global batch of "
                      f"{self.global_batch} ({self.global_batch // self.processes} per process; memory per process"
                      + ("; weights, gradients and optimizer state sharded: 1/"
                         f"{self.processes} each)" if self.strategy == "fsdp" else ")"))
        lines = [first]
        if self.estimate is not None:
            where = "VRAM" if self.device == "cuda" else "RAM"
            verdict = "fits" if self.fits else "DOES NOT FIT"
            lines.append(f"{where} {verdict}: {self.estimate.summary()} — budget {self.budget_gb:.1f} GB")
        return "\n".join(lines + [f"  · {r}" for r in self.reasons])


def estimate_config_dir(model_path, config_path):
    """The folder whose configs the memory estimate reads: the user's config folder, else the model itself when
    it is a diffusers folder (None: the family's shipped full-size configs, right for single files)."""
    from pathlib import Path
    if config_path:
        return Path(config_path)
    if model_path and Path(model_path).is_dir():
        return Path(model_path)
    return None


def text_cache_blockers(settings) -> list[str]:
    """Why text-encoder outputs cannot be cached for this run (empty when they can)."""
    out = []
    import architectures
    from core.embeddings import TEXTUAL_INVERSION, trains_new_token
    if trains_new_token(settings.network, architectures.get(settings.model.architecture)):
        out.append(("textual inversion" if settings.network.algorithm == TEXTUAL_INVERSION else "pivotal tuning")
                   + " trains the token's embedding")
    elif settings.network.train_text_encoder:
        out.append("the text encoder is trained")
    if settings.dataset.uses("shuffle_caption"):  # in any subset
        out.append("captions are shuffled every step")
    return out


def triton_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("triton") is not None


def bitsandbytes_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("bitsandbytes") is not None


def choose_attention_backend(gpu, precision: str, requested: str = "auto") -> tuple[str, str]:
    """(SDPA backend, reason; empty for an explicit choice).  ``core.attention`` decides: flash on NVIDIA
    sm80+ in bf16/fp16 (PyTorch's default, cuDNN attention, crashed in FLUX.1 backward on an H100);
    memory-efficient on older GPUs or in fp32; PyTorch's default on the CPU (its CPU flash kernel).  An
    explicit backend the machine cannot run raises ValueError naming memory.attention."""
    from core.attention import check_attention, choose_attention
    if requested == "auto":
        return choose_attention(gpu, precision)
    check_attention(requested, gpu, precision)
    return requested, ""


def _budget(profile, memory) -> tuple[float, str]:
    gpu = profile.gpus[0] if profile.gpus else None
    if gpu is None:
        return max(profile.ram_available_gb, 0.0), f"{profile.ram_available_gb:.1f} GB RAM available"
    if memory.vram_budget_gb > 0:
        return min(memory.vram_budget_gb, gpu.total_vram_gb), f"VRAM budget {memory.vram_budget_gb:g} GB"
    return gpu.total_vram_gb, f"{gpu.name} {gpu.total_vram_gb:.0f} GB"


def margin_gb(budget: float) -> float:
    return max(SAFETY_MARGIN_GB, SAFETY_MARGIN_SHARE * budget)


def make_plan(profile, settings, arch, config_dir=None) -> Plan:
    """``arch`` is the chosen family's plug-in; ``config_dir`` the run's model config folder when it is not
    the shipped full-size one (the estimate builds the denoiser from it)."""
    from core.hardware import choose_precision, choose_tf32
    m = settings.memory
    gpu = profile.gpus[0] if profile.gpus else None
    cuda = gpu is not None
    reasons = []
    precision = choose_precision(profile, m.mixed_precision)
    if m.mixed_precision == "auto":
        reasons.append(f"precision {precision_name(precision)}: " + (
            ("no GPU; this CPU has bf16 instructions (AVX512-BF16 / AMX): bf16 base weights under bf16 "
             "autocast, fp32 adapter weights (an SD1.5 step measured 2.3x faster than fp32)" if precision == "bf16"
             else "no GPU, and this CPU lacks bf16 instructions (AVX512-BF16 / AMX): bf16 would be emulated, "
                  "far slower than fp32") if gpu is None
            else f"{gpu.name} {'supports' if precision == 'bf16' else 'lacks'} bf16"
            + ("" if precision == "bf16" else ", fp16 with loss scaling")))
    elif gpu is None and precision == "bf16" and not profile.cpu_bf16:
        reasons.append("precision bf16 as set, but this CPU lacks bf16 instructions (AVX512-BF16 / AMX): emulated "
                       "bf16 is far slower than fp32 here (memory.mixed_precision 'auto' or 'no' picks fp32)")
    if precision == "fp16" and m.mixed_precision == "auto" and settings.distributed.strategy == "fsdp":
        # (an explicit fp16 is refused by core.fsdp.fsdp_problems)
        raise ValueError(f"{gpu.name} lacks bf16, and fp16's loss scaling does not handle FSDP's sharded gradients: "
                         "set memory.mixed_precision to 'no' (fp32, Memory tab), or choose DDP (Distributed → "
                         "Strategy)")
    tf32 = choose_tf32(profile, m.tf32)
    attention, why = choose_attention_backend(gpu, precision, m.attention)
    if why:
        reasons.append(why)

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
    if m.channels_last == "auto":
        channels_last = False
        if cuda and arch.convolutional:
            reasons.append("channels-last off: measured within noise on an H100")
    else:
        channels_last = m.channels_last == "on"
    from core.distributed import process_count
    processes = process_count(settings, len(profile.gpus))
    cpu_threads = 0
    if not cuda:
        physical = getattr(profile, "physical_cores", None) or profile.cpu_cores
        cpu_threads = m.cpu_threads or max(1, int(physical) // processes)
        if not m.cpu_threads:
            reasons.append(f"{cpu_threads} CPU threads: one per physical core" if processes == 1 else
                           f"{cpu_threads} CPU threads per process: the physical cores shared by {processes}")
    elif m.cpu_threads:
        cpu_threads = m.cpu_threads

    # -- explicit memory choices: followed, or refused when impossible ---------------------------------
    optimizer = settings.optimizer.optimizer_type
    full_ft = settings.network.algorithm == "full_finetune"
    if optimizer.endswith("8bit") and not cuda:
        plain = optimizer.removeprefix("Paged").removesuffix("8bit")
        raise ValueError(f"optimizer.optimizer_type: {optimizer} needs an NVIDIA GPU (bitsandbytes); this run is on "
                         f"the CPU. Choose {plain}.")
    if m.optimizer_8bit == "on":
        if not cuda:
            raise ValueError("memory.optimizer_8bit is 'on', but 8-bit optimizer state (bitsandbytes) needs an "
                             "NVIDIA GPU; this run is on the CPU. Set it to 'auto' or 'off'.")
        if optimizer not in EIGHT_BIT_OPTIMIZERS + ("AdamW8bit", "PagedAdamW8bit", "Lion8bit", "PagedLion8bit"):
            raise ValueError(f"memory.optimizer_8bit is 'on', but 8-bit state exists for AdamW and Lion only, not "
                             f"{optimizer}. Set it to 'auto' or 'off', or choose AdamW / Lion.")
    for name in ("quantize_base", "quantize_text_encoder"):
        value = getattr(m, name)
        if value == "nf4" and not cuda:
            raise ValueError(f"memory.{name} is 'nf4', which needs an NVIDIA GPU (bitsandbytes); this run is on "
                             f"the CPU. Choose qint4 (optimum-quanto), another method or 'auto'.")
        if value == "nf4" and not bitsandbytes_available():
            raise ValueError(f"memory.{name} is 'nf4', which needs the bitsandbytes package (not installed). "
                             f"Choose qint4 (optimum-quanto) or 'auto'.")
    if full_ft and m.quantize_base not in ("auto", "none"):
        raise ValueError(f"memory.quantize_base is {m.quantize_base!r}, but full fine-tuning trains the model's own "
                         f"weights, which cannot be quantized. Set it to 'auto' or 'none'.")
    if m.activation_offload == "on" and not cuda:
        raise ValueError("memory.activation_offload is 'on', but this run is on the CPU, where activations already "
                         "are in CPU memory. Set it to 'auto' or 'off'.")
    swappable = len(arch.block_lists) and _swappable(arch, config_dir)
    if m.blocks_to_swap > 0:
        if m.quantize_base == "nf4":
            raise ValueError(f"memory.blocks_to_swap is {m.blocks_to_swap} with memory.quantize_base 'nf4': "
                             "bitsandbytes' 4-bit weights are quantized on their way to the GPU and cannot be "
                             "streamed. Use qint4 for a 4-bit base with block swapping.")
        if not cuda:
            raise ValueError(f"memory.blocks_to_swap is {m.blocks_to_swap}, but block swapping moves blocks between "
                             f"CPU memory and a GPU; this run is on the CPU. Set it to -1 (auto) or 0.")
        if not swappable:
            raise ValueError(f"memory.blocks_to_swap is {m.blocks_to_swap}, but {arch.label} has no swappable "
                             f"blocks here. Set it to -1 (auto) or 0.")
        if full_ft and not steps_in_backward(settings):
            raise ValueError(f"memory.blocks_to_swap is {m.blocks_to_swap} in a full fine-tune: a swapped block's "
                             f"weights must be updated while it is on the GPU, which needs Adafactor with "
                             f"optimizer.fused_backward_pass on. Turn that on, or set blocks_to_swap to -1 (auto) "
                             f"or 0.")
        if m.blocks_to_swap > swappable:
            raise ValueError(f"memory.blocks_to_swap is {m.blocks_to_swap}, but {arch.label} has only {swappable} "
                             f"blocks that can be swapped. Set at most {swappable}, or -1 (auto).")

    budget, budget_text = _budget(profile, m)
    if not cuda and processes > 1:  # the processes share the machine's RAM
        budget, budget_text = budget / processes, f"{budget_text}, shared by {processes} processes"
    margin = margin_gb(budget)
    plan = Plan(device="cuda" if cuda else "cpu", mixed_precision=precision, tf32=tf32,
                gradient_checkpointing=m.gradient_checkpointing == "on", cache_text_encoder_outputs=cache_te,
                compile=compile_how, reasons=reasons, attention=attention,
                blocks_to_swap=max(m.blocks_to_swap, 0), quantize_base="none" if m.quantize_base == "auto"
                else m.quantize_base, quantize_text_encoder="none" if m.quantize_text_encoder == "auto"
                else m.quantize_text_encoder, activation_offload=m.activation_offload == "on",
                optimizer_8bit=optimizer == "AdamW8bit" or m.optimizer_8bit == "on", channels_last=channels_last,
                cpu_threads=cpu_threads, budget_gb=budget, swappable_blocks=int(swappable or 0),
                processes=processes, global_batch=processes * settings.schedule.train_batch_size,
                strategy=settings.distributed.strategy if processes > 1 else "ddp")
    try:
        _fit_memory(plan, profile, settings, arch, config_dir, budget, budget_text, margin)
    except PlanRefusal:
        raise
    except Exception as exc:  # an estimate failure never blocks a run: fall back to the simple rule
        plan.estimate = None
        if m.gradient_checkpointing == "auto":
            plan.gradient_checkpointing = cuda and gpu.total_vram_gb < arch.checkpointing_below_gb
        reasons.append(f"memory estimate unavailable ({exc.__class__.__name__}: {exc}); gradient checkpointing "
                       f"{'on' if plan.gradient_checkpointing else 'off'} by the family's rule of thumb")
    if m.compile == "auto" and plan.compile != "off" and plan.strategy == "fsdp":
        plan.compile = "off"
        reasons.append("compile off: not yet verified on GPUs together with FSDP (set it to 'regional' to try)")
    if m.compile == "auto" and plan.compile != "off" and (plan.quantize_base != "none" or plan.blocks_to_swap):
        # both run and compile on the CPU in the tests, but neither has been checked under inductor on a GPU
        plan.compile = "off"
        reasons.append("compile off: not yet verified on a GPU together with a quantized base or block swapping "
                       "(set it to 'regional' to try)")
    _choose_cuda_graphs(plan, settings, arch)
    return plan


def _choose_cuda_graphs(plan: Plan, settings, arch) -> None:
    """memory.cuda_graphs: 'on' is followed or refused with every reason; 'auto' stays off until capture has been
    verified on a GPU (the reason says whether this run could be captured)."""
    from core.cuda_graph import capture_blockers
    choice = settings.memory.cuda_graphs
    if choice == "off":
        return
    blockers = capture_blockers(settings, arch, plan)
    if choice == "on":
        if blockers:
            raise ValueError("memory.cuda_graphs is 'on', but this run's step cannot be captured: "
                             + "; ".join(blockers) + ". Change those, or set memory.cuda_graphs to 'auto' or 'off'.")
        plan.cuda_graphs = True
        plan.reasons.append("CUDA graphs on: the step is captured per bucket shape after a few eager steps")
    elif plan.device == "cuda":
        plan.reasons.append("CUDA graphs off: " + ("; ".join(blockers) if blockers else
                            "not yet verified on a GPU in this project (memory.cuda_graphs 'on' tries it)"))


def steps_in_backward(settings) -> bool:
    """Whether the optimizer steps each weight inside the backward pass (no full set of gradients is held)."""
    return settings.optimizer.optimizer_type == "Adafactor" and settings.optimizer.fused_backward_pass


def _swappable(arch, config_dir) -> int:
    from core.estimate import denoiser_stats
    try:
        return len(denoiser_stats(arch, config_dir).blocks)
    except Exception:
        return 0


# ---------------------------------------------------------------------------------------------------------
# fitting the run into the budget
# ---------------------------------------------------------------------------------------------------------
def _fit_memory(plan: Plan, profile, settings, arch, config_dir, budget, budget_text, margin) -> None:
    from core.estimate import EstimateInputs, estimate
    m = settings.memory
    gpu = profile.gpus[0] if profile.gpus else None
    cuda = gpu is not None
    optimizer = settings.optimizer.optimizer_type
    full_ft = settings.network.algorithm == "full_finetune"
    base = EstimateInputs(
        resolution=settings.dataset.largest_resolution(), batch_size=int(settings.schedule.train_batch_size),
        precision=plan.mixed_precision, device=plan.device, attention=plan.attention, optimizer=optimizer,
        cache_text_encoder_outputs=plan.cache_text_encoder_outputs,
        train_text_encoder=bool(settings.network.train_text_encoder), fused_backward=steps_in_backward(settings),
        shards=plan.processes if plan.strategy == "fsdp" else 1,
        network_json=settings.network.model_dump_json(), config_dir=str(config_dir or ""))
    ram_free = max(profile.ram_available_gb - RAM_RESERVE_GB, 0.0)
    limit = budget - margin

    def est(ckpt, opt8, quant, swap, offload, te="none"):
        return estimate(arch, replace(base, gradient_checkpointing=ckpt, optimizer_8bit=opt8, quantize_base=quant,
                                      blocks_to_swap=swap, activation_offload=offload, quantize_text_encoder=te))

    # the ladder, fastest first; explicit choices replace the ladder's value on every rung
    q8 = "qfloat8" if cuda and gpu.compute_capability >= (8, 9) else "qint8"
    # bitsandbytes' 8-bit state is not made for FSDP's sharded parameters (core.fsdp refuses it when asked)
    can_opt8 = cuda and optimizer in EIGHT_BIT_OPTIMIZERS and plan.strategy != "fsdp"
    can_quant = cuda and not full_ft
    # a full fine-tune's blocks can be swapped only when each weight is updated while its block is on the GPU
    swappable = plan.swappable_blocks if cuda and (not full_ft or steps_in_backward(settings)) else 0
    # the 4-bit rung swaps blocks too where the family can: bitsandbytes' 4-bit weights are quantized on their
    # way to the GPU and cannot be streamed, so swapping families take quanto's qint4
    q4 = "nf4" if cuda and bitsandbytes_available() and not swappable else "qint4"
    rungs = [dict(ckpt=False, opt8=False, quant="none", swap=False, offload=False),
             dict(ckpt=True, opt8=False, quant="none", swap=False, offload=False)]
    if can_opt8:
        rungs.append(dict(rungs[-1], opt8=True))
    if can_quant:
        rungs.append(dict(rungs[-1], quant=q8))
    if swappable:
        rungs.append(dict(rungs[-1], swap=True))
    if can_quant:
        rungs.append(dict(rungs[-1], quant=q4))
    if cuda:
        rungs.append(dict(rungs[-1], offload=True))

    def resolve(r):
        ckpt = r["ckpt"] if m.gradient_checkpointing == "auto" else m.gradient_checkpointing == "on"
        opt8 = plan.optimizer_8bit or (r["opt8"] if m.optimizer_8bit == "auto" else False)
        quant = r["quant"] if m.quantize_base == "auto" else m.quantize_base
        offload = r["offload"] if m.activation_offload == "auto" else m.activation_offload == "on"
        swap = r["swap"] if m.blocks_to_swap == -1 else None  # None: explicit count
        return ckpt, opt8, quant, swap, offload

    def fits(e):
        return e.training_gb + margin <= budget

    def ram_ok(e):
        return not cuda or e.ram_gb <= ram_free

    chosen = None
    tried = []
    ram_blocked = None
    seen = set()
    for r in rungs:
        ckpt, opt8, quant, swap, offload = resolve(r)
        key = (ckpt, opt8, quant, swap, offload)
        if key in seen:
            continue
        seen.add(key)
        if swap is None:
            n = plan.blocks_to_swap
        elif swap:
            n = _fewest_blocks(lambda k: est(ckpt, opt8, quant, k, offload), swappable, limit, ram_free)
            if n is None:
                ram_blocked = ram_blocked or (quant, _ram_needed(est(ckpt, opt8, quant, swappable, offload)))
                continue
        else:
            n = 0
        e = est(ckpt, opt8, quant, n, offload)
        tried.append(((ckpt, opt8, quant, n, offload), e))
        if fits(e) and ram_ok(e):
            chosen = (ckpt, opt8, quant, n, offload)
            break
        if fits(e) and not ram_ok(e):
            ram_blocked = ram_blocked or (quant, e.ram_gb)
    if chosen is None:  # nothing fits: the most memory-saving configuration, said plainly
        last = rungs[-1]
        ckpt, opt8, quant, swap, offload = resolve(last)
        n = plan.blocks_to_swap if swap is None else (_max_blocks_for_ram(
            lambda k: est(ckpt, opt8, quant, k, offload), swappable, ram_free) if swap else 0)
        if offload and m.activation_offload == "auto" and est(ckpt, opt8, quant, n, offload).ram_gb > ram_free:
            offload = False  # no RAM to offload into either
        chosen = (ckpt, opt8, quant, n, offload)
        plan.fits = False
    ckpt, opt8, quant, n, offload = chosen
    plan.gradient_checkpointing, plan.optimizer_8bit, plan.quantize_base = ckpt, opt8, quant
    plan.blocks_to_swap, plan.activation_offload = n, offload
    training = est(ckpt, opt8, quant, n, offload)

    # text encoders while captions are encoded
    te_method = plan.quantize_text_encoder
    if plan.cache_text_encoder_outputs and m.quantize_text_encoder == "auto":
        options = ["none"] + ([q8, q4, "stream"] if cuda else [])
        for te_method in options:
            if est(ckpt, opt8, quant, n, offload, te_method).caching_gb + margin <= budget:
                break
        plan.quantize_text_encoder = te_method
    final = est(ckpt, opt8, quant, n, offload, plan.quantize_text_encoder)
    plan.estimate = final
    if final.caching_gb + margin > budget:
        plan.fits = False

    # reasons
    r = plan.reasons
    need = f"≈ {{:.1f}} GB > {budget_text} − {margin:.2f} GB margin"
    first = tried[0][1] if tried else training
    if m.gradient_checkpointing == "auto":
        if ckpt and cuda:
            r.append(f"gradient checkpointing on: without it the run needs {need.format(first.training_gb)}")
        elif ckpt:
            r.append(f"gradient checkpointing on: without it the run needs {need.format(first.training_gb)} of RAM")
        else:
            r.append(f"gradient checkpointing off: ≈ {training.training_gb:.1f} GB fits {budget_text}")
    if m.optimizer_8bit == "auto" and cuda:
        r.append("8-bit optimizer state (bitsandbytes): " + ("on, the plan needs the memory" if opt8 else
                 "off, not needed" if optimizer in EIGHT_BIT_OPTIMIZERS else f"off, none for {optimizer}"))
    if m.quantize_base == "auto" and cuda:
        if quant != "none":
            kind = ("fp8 on a GPU with fp8 support" if quant == "qfloat8" else "int8 (no fp8 on this GPU)"
                    if quant == "qint8" else "4-bit: 8-bit does not fit")
            r.append(f"frozen base quantized {quant} ({kind}); the adapter trains in full precision")
        elif not full_ft:
            r.append("frozen base not quantized: it fits in " + ("bf16" if plan.mixed_precision == "bf16" else
                                                                 plan.mixed_precision))
    if m.blocks_to_swap == -1 and cuda and swappable:
        r.append(f"{n} of {swappable} blocks swapped to CPU memory" + (
            f" (≈ {training.ram_gb:.1f} GB RAM): just enough to fit" if n else ": not needed"))
    if ram_blocked and (m.blocks_to_swap == -1) and cuda:
        q, need_ram = ram_blocked
        r.append(f"block swapping with a {q if q != 'none' else 'bf16'} base would need ≈ {need_ram:.1f} GB of RAM, "
                 f"only {ram_free:.1f} GB can be spared ({profile.ram_available_gb:.1f} GB available − "
                 f"{RAM_RESERVE_GB:.0f} GB reserve)")
    if m.blocks_to_swap > 0 and training.ram_gb > ram_free:
        raise PlanRefusal(f"memory.blocks_to_swap is {m.blocks_to_swap}: the swapped blocks need ≈ "
                         f"{training.ram_gb:.1f} GB of CPU RAM, but only {ram_free:.1f} GB can be spared "
                         f"({profile.ram_available_gb:.1f} GB available). Swap fewer blocks, quantize the base, "
                         f"or set -1 (auto).")
    if cuda and final.ram_gb + final.text_encoder_ram_gb > ram_free and final.text_encoder_ram_gb > 0.5:
        r.append(f"CPU RAM is short: the text encoders parked in RAM after caching (≈ {final.text_encoder_ram_gb:.1f} "
                 f"GB) + swapped blocks / offloaded activations (≈ {final.ram_gb:.1f} GB) exceed the "
                 f"{ram_free:.1f} GB that can be spared: free the text encoders after caching (previews then "
                 f"reload them)")
    # every process reads the model at once; an FSDP run's other workers read no denoiser where the family can
    # load without it (rank 0 sends them their shards: core.fsdp), only the text encoders
    load_gb = loading_ram_gb(final, settings, arch, plan)
    rank0_only = settings.distributed.strategy == "fsdp" and arch.loads_without_text_encoders
    load_gb += (plan.processes - 1) * (final.load_text_encoders_gb if rank0_only else load_gb)
    if load_gb > profile.ram_total_gb:
        each = f", by each of the {plan.processes} processes" if plan.processes > 1 and not rank0_only else \
            f" (the denoiser by the first of the {plan.processes} processes only)" if plan.processes > 1 else ""
        r.insert(0, f"CPU RAM is short for loading: the model's files are read into RAM whole{each} (≈ "
                    f"{load_gb:.0f} GB in {plan.mixed_precision if plan.mixed_precision != 'no' else 'fp32'}, "
                    f"before any quantization) and this machine has {profile.ram_total_gb:.0f} GB; without enough "
                    f"swap space the system will stop the app while loading")
    if m.activation_offload == "auto" and cuda and offload:
        r.append("activations offloaded to CPU memory (≈15% slower): nothing else fits")
    if plan.cache_text_encoder_outputs and m.quantize_text_encoder == "auto" and cuda and final.caching_parts:
        te_gb = final.caching_parts.get("text encoders", 0.0)
        r.append("text encoders for caching: " + {
            "none": f"not quantized ({te_gb:.1f} GB fits)", "stream": "streamed layer by layer (even 4-bit "
            "does not fit)"}.get(plan.quantize_text_encoder, f"{plan.quantize_text_encoder} ({te_gb:.1f} GB; "
                                                              f"not quantized they do not fit)"))
    if not plan.fits:
        where = "VRAM" if cuda else "RAM"
        r.insert(0, f"DOES NOT FIT: the run needs ≈ {final.total_gb:.1f} GB, the {where} budget is {budget:.1f} GB "
                    f"({budget_text}, {margin:.2f} GB kept free) even with every saving applied. Lower the "
                    f"resolution or the batch size, train fewer layers, or use a larger GPU."
                    + (" A full fine-tune can also swap blocks to CPU memory with Adafactor and "
                       "optimizer.fused_backward_pass on." if cuda and full_ft and plan.swappable_blocks
                       and not steps_in_backward(settings) else ""))


def loading_ram_gb(e, settings, arch, plan) -> float:
    """CPU memory while the model is read.  Families that can load their text encoders alone do so when only
    caption caching needs them (no previews, no text-encoder training): one of the two is in RAM at a time."""
    previews = settings.sampling.sample_every_n_steps > 0 and settings.sampling.prompts.strip()
    alone = (arch.loads_without_text_encoders and plan.cache_text_encoder_outputs and not previews
             and settings.network.algorithm != "full_finetune" and not settings.network.train_text_encoder)
    if not alone:
        return e.load_ram_gb
    rest = e.load_ram_gb - e.load_text_encoders_gb      # denoiser + VAE (the VAE, < 0.4 GB, is read both times)
    return max(rest, e.load_text_encoders_gb)


def _ram_needed(e) -> float:
    return e.ram_gb


def _fewest_blocks(est_k, swappable: int, limit: float, ram_free: float) -> int | None:
    """The fewest swapped blocks whose estimate fits ``limit`` and whose RAM need fits (None: none does)."""
    if est_k(swappable).training_gb > limit:
        return None
    lo, hi = 0, swappable  # est(hi) fits; memory falls as k grows
    while lo < hi:
        mid = (lo + hi) // 2
        if est_k(mid).training_gb <= limit:
            hi = mid
        else:
            lo = mid + 1
    return lo if est_k(lo).ram_gb <= ram_free else None


def _max_blocks_for_ram(est_k, swappable: int, ram_free: float) -> int:
    k = swappable
    while k > 0 and est_k(k).ram_gb > ram_free:
        k -= 1
    return k
