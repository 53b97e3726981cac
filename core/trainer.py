"""The training run: load → cache → adapt → one linear training step in a loop → save.

The trainer talks to the chosen family only through ``architectures.base.Architecture``.  The step is kept
free of host synchronisation: losses accumulate on the device and are read once per report interval.
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import architectures
from core import dataset as ds_mod
from core.config import AppConfig, load_config
from core.cuda_graph import TrainingStep
from core.distributed import SOLO, Solo, process_count, take_rows, train_on_processes
from core.events import RunFailed, SaveFailed, TrainingDiverged, emit
from core.full_finetune import EMA, FULL_FINETUNE, FullFineTune
from core.controlnet import (CONTROLNET, ConditioningImages, ControlNetTrainable, check_controlnet_source,
                             controlnet_metadata, match_conditioning_images, save_controlnet_folder)
from core.fsdp import FSDP, ShardedFullFineTune, resume_problems
from core.embeddings import (EMBEDDING_FILE_SUFFIX, TEXTUAL_INVERSION, PivotalTuning, TextualInversion,
                             check_token_in_captions, embedding_metadata, trains_new_token)
from core.export import SAVE_DTYPES, adapter_metadata, save_adapter_files, tag_frequency
from core.memory_setup import run_context, setup_denoiser, text_encoder_on_device, torch_switches
from core.loss import conditional_loss, huber_threshold, multires_noise, timestep_range
from core.io import (NonFiniteError, atomic_save_image, atomic_save_safetensors, atomic_torch_save,
                     atomic_write_json, check_finite, unused_path, unused_stem)
from core.optim import (build_fused_backward_optimizer, build_optimizer, build_scheduler, optimizer_kwargs,
                        schedule_free)
from core.plan import estimate_config_dir, make_plan, steps_in_backward
from core.prefetch import prefetched_batches
from core.prompts import parse_prompts
from core.speed import host_values
from core.run_log import RunLog, log_problems, run_log_folder
from core.text_cache import TextCache
from core.settings import Settings, SettingsError, check_consistency

STATE_INFIX = "-state-"  # state folders are "<run stem>-state-<step>": they belong to the run that wrote them


@dataclass
class TrainResult:
    outputs: list[Path] = field(default_factory=list)
    final: Path | None = None
    stopped: bool = False
    steps: int = 0
    state_dir: Path | None = None
    samples: list[Path] = field(default_factory=list)
    #: (step, validation loss) of every measurement, those before a resume included
    validation: list[tuple[int, float]] = field(default_factory=list)


class TrainingStopped(Exception):
    """Stop was pressed before the first training step of this run: there is nothing new to save."""


class StepLosses:
    """The loss of every optimizer step of a report interval, kept on the device: ``add`` (each batch) and ``step``
    (each optimizer step) only queue device work; ``read`` copies the interval to the host once, at the report,
    so the chart gets every step's loss without a device read per step."""

    def __init__(self, device: torch.device, capacity: int):
        self.device = device
        self.values = torch.zeros(max(1, capacity), device=device)
        self.reset()

    def reset(self) -> None:
        self.total = torch.zeros((), device=self.device)      # every batch of the interval (the divergence guard)
        self.current = torch.zeros((), device=self.device)    # the batches of the step being accumulated
        self.batches = self.total_batches = self.n = 0

    def add(self, loss: torch.Tensor) -> None:
        self.current = self.current + loss.detach()
        self.total = self.total + loss.detach()
        self.batches += 1
        self.total_batches += 1

    def step(self) -> None:
        if self.n == self.values.numel():
            self.values = torch.cat([self.values, torch.zeros_like(self.values)])
        self.values[self.n] = self.current / max(1, self.batches)
        self.n += 1
        self.current = torch.zeros((), device=self.device)
        self.batches = 0

    def use_step_total(self, step_total: torch.Tensor) -> None:
        """The step's loss summed over the workers of a several-process run, in place of this worker's share."""
        self.total = self.total + (step_total - self.current)
        self.current = step_total

    def read(self) -> tuple[float, list[float]]:
        """(the interval's mean batch loss, each step's loss), then a new interval."""
        host = torch.cat([(self.total / max(1, self.total_batches)).reshape(1), self.values[:self.n]]).tolist()
        self.reset()
        return host[0], host[1:]


class DivergenceGuard:
    """The first optimizer step whose loss (or gradient norm) was not finite, recorded on the device.

    ``update`` is called every optimizer step and only queues a few scalar kernels; the host reads the record
    (``first_bad``) when it needs it anyway (a loss report, a save, a preview, the end), so the step never
    waits for the device."""

    LOSS_NAN, LOSS_INF, GRAD_NORM = 1, 2, 3

    def __init__(self, device: torch.device, step: int):
        self.step = torch.full((), step, dtype=torch.long, device=device)
        self.bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self.bad_kind = torch.zeros((), dtype=torch.long, device=device)

    def update(self, loss: torch.Tensor, grad_norm: torch.Tensor | None = None) -> None:
        self.step += 1
        kind = torch.where(torch.isnan(loss), self.LOSS_NAN, torch.where(torch.isinf(loss), self.LOSS_INF, 0))
        if grad_norm is not None:
            kind = torch.where((kind == 0) & ~torch.isfinite(grad_norm), self.GRAD_NORM, kind)
        first = (self.bad_step < 0) & (kind > 0)
        # in place: the record keeps its storage, as a captured step needs
        self.bad_step.copy_(torch.where(first, self.step, self.bad_step))
        self.bad_kind.copy_(torch.where(first, kind, self.bad_kind))

    def first_bad(self) -> tuple[int, str] | None:
        """(step, what) of the first non-finite value, or None (reads the device)."""
        step = int(self.bad_step.item())
        if step < 0:
            return None
        what = {self.LOSS_NAN: "Loss became NaN", self.LOSS_INF: "Loss became infinite",
                self.GRAD_NORM: "The gradient norm became NaN or infinite"}[int(self.bad_kind.item())]
        return step, what


def train(settings: Settings, on_event=None, stop_event: threading.Event | None = None,
          config: AppConfig | None = None) -> TrainResult:
    """Train an adapter as ``settings`` say; returns what was saved.  Progress goes to ``on_event``.  A run of
    several processes (``distributed.num_processes``) starts them here and follows its rank 0 (core.distributed)."""
    try:
        stop_event, config = stop_event or threading.Event(), config or load_config()
        processes = process_count(settings)
        if processes > 1:
            return train_on_processes(settings, processes, on_event, stop_event, config)
        return _Run(settings, on_event, stop_event, config).run()
    except Exception as exc:  # the UI shows the message; scripts get the exception
        emit(on_event, "error", message=str(exc) or type(exc).__name__)
        raise


def model_fingerprint(path: Path) -> str:
    """Short id of the base model's files (name, sizes, times): cached latents follow the VAE they came from."""
    import hashlib
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.sha1()
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(path.parent)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def on_device(module: torch.nn.Module, device: torch.device) -> bool:
    """Whether the module's weights are on ``device`` ("cuda" and "cuda:0" count as the same)."""
    p = next(module.parameters()).device
    return p.type == device.type and (device.index is None or p.index in (None, device.index))


def steps_per_epoch(batches_per_epoch: int, accumulation: int) -> int:
    return max(1, math.ceil(batches_per_epoch / accumulation))


def accumulation_group(batch_index: int, batches_per_epoch: int, accumulation: int) -> tuple[int, bool]:
    """(size of the accumulation group this batch belongs to, whether the optimizer steps after it).

    Groups never cross an epoch's end: the last, partial group of an epoch steps too (its loss averaged over
    its own size), so every epoch makes ``steps_per_epoch`` optimizer steps."""
    start = batch_index - batch_index % accumulation
    end = min(start + accumulation, batches_per_epoch)
    return end - start, batch_index + 1 == end


def total_steps_and_epochs(settings: Settings, batches_per_epoch: int) -> tuple[int, int]:
    per_epoch = steps_per_epoch(batches_per_epoch, settings.schedule.gradient_accumulation_steps)
    if settings.schedule.max_train_epochs > 0:
        return settings.schedule.max_train_epochs * per_epoch, settings.schedule.max_train_epochs
    total = settings.schedule.max_train_steps
    return total, math.ceil(total / per_epoch)


def check_resume(state_dir: Path, settings: Settings, processes: int = 1) -> dict:
    """The state folder's ``train_state.json`` after checking, before anything loads, that this run can
    continue it: the same architecture, the same value for every network setting (a difference is named) and a
    strategy and process count it can continue with (``core.fsdp.resume_problems``)."""
    info_path = state_dir / "train_state.json"
    if not info_path.is_file():
        raise SettingsError(f"saving.resume_from: {state_dir} is not a state folder written by this trainer "
                            f"(no train_state.json)")
    info = json.loads(info_path.read_text(encoding="utf-8"))
    arch_id = settings.model.architecture
    if info["architecture"] != arch_id:
        raise SettingsError(f"saving.resume_from: that state is from a {info['architecture']} run; this run is "
                            f"{arch_id}. Choose that architecture, or a state of a {arch_id} run.")
    # states written before a network setting existed hold no value for it: compare with its default
    saved = {**type(settings.network)().model_dump(mode="json"), **info["network"]}
    ours = settings.network.model_dump(mode="json")
    differ = [f"network.{k} is {ours[k]!r} here but {saved.get(k)!r} in that run" for k in ours if saved.get(k) != ours[k]]
    if differ:
        raise SettingsError("saving.resume_from: a run can only continue with the network it was trained with: "
                            + "; ".join(differ) + ". Set them back, or start a new run without resuming.")
    problems = resume_problems(info, settings, processes)
    if problems:
        raise SettingsError(problems[0])
    return info


def optimizer_tensors(state: dict) -> dict[str, torch.Tensor]:
    """Every tensor of an optimizer's state dict, keyed by where it sits (for the finite check before saving)."""
    out: dict[str, torch.Tensor] = {}

    def walk(prefix: str, value) -> None:
        if torch.is_tensor(value):
            out[prefix] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{prefix}.{i}", v)

    walk("optimizer", state)
    return out


def diffusion_loss(arch, components, latents: torch.Tensor, cond: dict, batch: dict, settings: Settings,
                   weight_dtype: torch.dtype, autocast, fixed: tuple[torch.Tensor, torch.Tensor] | None = None,
                   rows: tuple[int, int, int] | None = None) -> torch.Tensor:
    """The training objective for one batch: noise (offset, multi-resolution, input perturbation), the family's
    target and weighting, the loss of ``schedule.loss_type`` per sample, weighted.

    ``fixed`` = (noise, level per sample) measures the objective at those instead of drawing them, without the
    noise options that only regularise training (the validation loss: comparable from one measurement to the
    next, and no draw from the training's random streams).

    ``batch["loss_weights"]`` (optional, one float per sample: DreamBooth's prior_loss_weight for
    regularization images) multiplies the per-sample loss.  The weights are a host-side list, copied without
    waiting for the device (``core.speed.host_values``); all-1 weights are skipped.

    ``rows`` = (start, stop, count): one worker's share of a several-process run (core.distributed).  The noise
    and levels are drawn for the whole batch as one process draws them, the model runs on rows [start, stop)
    only, and the loss is their sum over ``count``, so the workers' losses add up to the whole batch's.  A worker
    without rows runs the last row at weight 0: the same layers run, and draw the same random numbers, on every
    worker."""
    s = settings.schedule
    if fixed is not None:
        x = arch.noisy_input_and_target(components, latents, fixed[0], settings, level=fixed[1])
    else:
        noise = torch.randn_like(latents)
        if s.noise_offset > 0:
            noise = noise + s.noise_offset * torch.randn(latents.shape[0], latents.shape[1], 1, 1,
                                                         device=latents.device)
        if s.multires_noise_iterations > 0:
            noise = multires_noise(noise, s.multires_noise_iterations, s.multires_noise_discount)
        # input perturbation: the model sees extra noise that the target does not hold
        input_noise = noise + s.ip_noise_gamma * torch.randn_like(latents) if s.ip_noise_gamma > 0 else None
        x = arch.noisy_input_and_target(components, latents, noise, settings, input_noise)
    if rows is not None:
        start, stop, count = rows
        share = 1.0 / count if stop > start else 0.0
        if stop == start:
            start, stop = count - 1, count
        x, cond, batch = take_rows(arch, components, x, cond, batch, start, stop)
    with autocast():
        pred = arch.predict(components, x.noisy.to(weight_dtype), x.timesteps, cond, batch)
    huber_c = (huber_threshold(s.huber_schedule, s.huber_c, s.huber_scale, x.level, x.noise_to_signal)
               if s.loss_type != "l2" else None)
    elementwise = conditional_loss(pred.float(), x.target.float(), s.loss_type, huber_c)
    masks = batch.get("masks") if isinstance(batch, dict) else None
    if masks is not None:   # masked loss: what lies outside the mask does not count (sd-scripts' masked_loss)
        grid = F.interpolate(masks.to(pred.device, non_blocking=True), size=pred.shape[-2:], mode="area")
        elementwise = elementwise * grid
    per_sample = elementwise.mean(dim=tuple(range(1, pred.ndim)))
    loss_weights = batch.get("loss_weights") if isinstance(batch, dict) else None
    if isinstance(loss_weights, torch.Tensor):   # a captured step's static buffer (core.cuda_graph): always applied
        per_sample = per_sample * loss_weights
    elif loss_weights is not None and any(w != 1.0 for w in loss_weights):
        per_sample = per_sample * host_values(loss_weights, per_sample.device)
    return (per_sample * x.weight).mean() if rows is None else (per_sample * x.weight).sum() * share


class _Run:
    def __init__(self, settings: Settings, on_event, stop_event: threading.Event, config: AppConfig,
                 peers: Solo = SOLO):
        self.s = settings.model_copy(deep=True)
        self.peers = peers  # what this worker shares with the others of a several-process run (core.distributed)
        self.on_event = on_event
        self.stop_event = stop_event
        self.config = config
        self.result = TrainResult()

    # -- helpers ---------------------------------------------------------------------------------------
    def log(self, message: str, level: str = "info") -> None:
        emit(self.on_event, "log", level=level, message=message)

    def status(self, message: str, again: bool = False) -> None:
        """The run's current activity; ``again``: one it returns to (not news for a log)."""
        self.current_status = message
        emit(self.on_event, "status", message=message, **({"again": True} if again else {}))

    @contextlib.contextmanager
    def status_while(self, message: str):
        """``message`` as the status while a side task (a preview) runs, then the status it interrupted again:
        the page must not keep saying "Preview images" while training goes on."""
        before = getattr(self, "current_status", None)
        self.status(message)
        try:
            yield
        finally:
            if before is not None:
                self.status(before, again=True)

    def resolve_paths(self) -> None:
        s, c = self.s, self.config
        self.image_folders = [(f, c.resolve(f.path, "datasets_dir", f.setting)) for f in s.dataset.folders()]
        # the text-encoder disk cache lives beside the first training folder's images
        self.dataset_root = next(root for f, root in self.image_folders if not f.is_reg)
        self.model_path = c.resolve(s.model.model_path, "models_dir", "model.model_path")
        self.config_dir = c.resolve(s.model.config_path, "models_dir", "model.config_path") \
            if s.model.config_path else None
        self.output_dir = c.resolve(s.saving.output_dir or s.saving.output_name, "outputs_dir",
                                    "saving.output_dir" if s.saving.output_dir else "saving.output_name")

    def check_stop(self) -> None:
        """Called between the pieces of every phase before training: Stop is honoured within seconds."""
        if self.peers.stop_requested(self.stop_event):
            raise TrainingStopped

    # -- the run ---------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        try:
            with contextlib.ExitStack() as self.scope:  # what the run changes in the process, undone at its end
                return self.prepare_and_train()
        except TrainingStopped:
            self.peers.announce_stop()
            self.release()
            self.result.stopped = True
            message = "Stopped before the first training step; nothing was saved."
            self.log(message)
            emit(self.on_event, "done", outputs=[], final=None, stopped=True, peak_vram_gb=None, message=message)
            self.status("Stopped")
            return self.result
        except RunFailed:
            self.release()
            raise

    def release(self) -> None:
        """Unhook the adapters and give back what setup took (pinned swap buffers, hooks); once per run."""
        setup, self.setup = getattr(self, "setup", None), None
        if setup is not None:
            setup.network.restore()
            setup.release()

    def prepare_and_train(self) -> TrainResult:
        s = self.s
        problems = check_consistency(s) + log_problems(s.saving.log_with)
        if problems:
            raise SettingsError("Cannot start:\n" + "\n".join("  " + p for p in problems))
        self.resolve_paths()
        # the logs read the events the caller gets (host values: no device read of their own)
        run_log = RunLog(lambda: run_log_folder(self.output_dir, self.output_stem or s.saving.output_name),
                         s.saving.log_with if self.peers.writes else "none", s.to_dict(),
                         lambda message: self.log(message, level="warning"))
        self.scope.callback(run_log.close)
        caller = self.on_event
        self.on_event = lambda event: (run_log(event), caller is not None and caller(event))
        self.arch = architectures.get(s.model.architecture)
        self.full_ft = s.network.algorithm == FULL_FINETUNE
        # the checks allow FSDP only for a full fine-tune on several processes
        self.sharded = s.distributed.strategy == FSDP
        self.textual_inversion = s.network.algorithm == TEXTUAL_INVERSION
        self.pivotal = trains_new_token(s.network, self.arch) and not self.textual_inversion  # beside the adapter
        self.controlnet = s.network.algorithm == CONTROLNET
        self.resume_dir = self.config.resolve(s.saving.resume_from, "outputs_dir", "saving.resume_from") \
            if s.saving.resume_from else None
        self.resume_info = check_resume(self.resume_dir, s, self.peers.world) if self.resume_dir else None
        self.check_stop()

        self.status("Reading the dataset")
        self.items = self.scan_images()
        if s.dataset.masked_loss and s.dataset.mask_path.strip():
            ds_mod.attach_masks(self.items, self.dataset_root,
                                self.config.resolve(s.dataset.mask_path, "datasets_dir", "dataset.mask_path"))
        ds_mod.assign_buckets(self.items, s.dataset)
        self.items, self.val_items = ds_mod.split_validation(self.items, s.dataset.validation_split,
                                                             s.dataset.validation_seed)
        if self.val_items:
            self.log(f"{len(self.val_items)} image(s) held out for the validation loss (not trained on)")
        self.validation_history: list[tuple[int, float]] = []
        train_items = [i for i in self.items if not i.is_reg]
        self.log(f"{len(train_items)} images, {sum(i.repeats for i in train_items)} per epoch with repeats, "
                 f"{len({i.bucket for i in self.items})} bucket(s)")
        if self.textual_inversion or self.pivotal:
            check_token_in_captions(s.network.ti_token, [i.caption for i in train_items])
        self.conditioning = None
        if self.controlnet:  # every image's conditioning image, checked before anything loads
            folder = self.config.resolve(s.dataset.conditioning_path, "datasets_dir", "dataset.conditioning_path")
            self.conditioning = ConditioningImages(
                match_conditioning_images(self.items + self.val_items, self.dataset_root, folder))
            init = s.network.controlnet_init.strip()
            self.controlnet_init = self.config.resolve(init, "models_dir", "network.controlnet_init") \
                if init else None
            if self.controlnet_init is not None:
                check_controlnet_source(self.controlnet_init)

        from core.hardware import detect_hardware
        self.profile = detect_hardware()
        # the estimate reads the denoiser's config: the model's own for a diffusers folder, else the shipped one
        self.plan = make_plan(self.profile, s, self.arch, estimate_config_dir(self.model_path, self.config_dir))
        self.log("Plan: " + self.plan.summary())
        estimate = self.plan.estimate
        emit(self.on_event, "plan", summary=self.plan.summary(), fits=self.plan.fits, device=self.plan.device,
             estimate_gb=estimate.total_gb if estimate is not None else None, budget_gb=self.plan.budget_gb)
        if not self.plan.fits:
            if self.plan.device == "cuda":
                raise SettingsError(
                    f"Cannot start: {self.plan.reasons[0]}. Lower dataset.resolution or schedule.train_batch_size, "
                    "or set the memory choices to 'auto' so the plan may save more. To try anyway, raise "
                    "memory.vram_budget_gb above the estimate.")
            self.log(self.plan.reasons[0], level="warning")
        if s.optimizer.fused_backward_pass and s.optimizer.optimizer_type == "Adafactor" \
                and self.plan.mixed_precision == "fp16":
            raise SettingsError("optimizer.fused_backward_pass cannot use fp16 loss scaling (this GPU has no "
                                "bf16): turn it off or train in fp32 (memory.mixed_precision 'no')")
        self.check_stop()

        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import set_seed
        # accelerate holds one mixed precision per process and refuses another: a run after one in another
        # precision (the app, the tests) starts from a fresh state
        AcceleratorState._reset_state()
        # gradient accumulation is done by the loop itself (accumulation_group): accelerate's counter runs
        # across epoch ends and would drop or merge the last micro-batches of an epoch
        self.accelerator = Accelerator(mixed_precision=self.plan.mixed_precision, cpu=self.plan.device == "cpu")
        self.device = self.accelerator.device
        self.scope.enter_context(torch_switches(self.plan, self.device))
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        set_seed(s.schedule.seed)

        # family-specific load arguments (e.g. FLUX's separate text-encoder / autoencoder files)
        self.load_options = self.arch.load_options(
            s, lambda value, setting: self.config.resolve(value, "models_dir", setting))
        # full fine-tuning trains fp32 master weights; frozen parts are cast to the plan's dtype later
        load_dtype = torch.float32 if self.full_ft else self.plan.weight_dtype
        extra = [p for p in self.load_options.values() if isinstance(p, Path) and p.exists()]
        self.model_fingerprints = [model_fingerprint(self.model_path), *map(model_fingerprint, extra)]
        self.open_text_cache()
        self.text_encoders_quantized = False
        skip_te = self.text_encoders_never_needed()
        if skip_te:
            self.log("Every caption's text-encoder outputs are in the disk cache and no previews are rendered: "
                     "the text encoders are not loaded")
        elif self.text_encoders_only_for_caching():
            # text encoders first, alone: encode, drop them, then read the denoiser, so loading never holds both
            self.status(f"Loading {self.arch.label}'s text encoders")
            self.components = self.arch.load(self.model_path, self.config_dir, load_dtype, **self.load_options,
                                             denoiser=False)
            self.check_stop()
            self.arch.configure_objective(self.components, s)
            for te in self.components.text_encoders:
                te.requires_grad_(False)
            with run_context(self.plan):
                self.encode_missing_captions()
            self.components = None
            import gc
            gc.collect()
            skip_te = True
        self.check_stop()
        self.status(f"Loading {self.arch.label} from {self.model_path}")
        # a sharded run's other workers read no denoiser: they build it empty and rank 0 sends their shards
        empty_denoiser = self.sharded and not self.peers.writes and self.arch.loads_without_text_encoders
        self.components = self.arch.load(self.model_path, self.config_dir, load_dtype, **self.load_options,
                                         **({"text_encoders": False} if skip_te else {}),
                                         **({"denoiser": False} if empty_denoiser else {}))
        if empty_denoiser:
            self.components.denoiser = self.arch.build_denoiser_on_meta(
                estimate_config_dir(self.model_path, self.config_dir))
        self.check_stop()
        self.arch.configure_objective(self.components, s)
        c = self.components
        for module in [c.denoiser, c.vae, *c.text_encoders]:
            module.requires_grad_(False)
        # the denoiser stays in CPU memory until the captions and images are cached (setup_denoiser moves it)
        # the VAE runs in fp32: SD VAEs overflow in fp16 and it is only used for caching and previews
        # nn.Module.to: diffusers' override warns about fp32 modules even when its list of them is empty
        torch.nn.Module.to(c.vae, self.device, torch.float32)

        with run_context(self.plan):
            self.prepare_data()
            self.prepare_text()
            self.peers.share_text(self.text_cache)
            # seeded again after caching: what caching drew (VAE sampling) depends on what was on disk already
            set_seed(s.schedule.seed)
            self.check_stop()
            self.prepare_network()
            self.release_text_encoders()
            return self.train_loop()

    def scan_images(self) -> list:
        """Every folder's images (dataset.path, dataset.reg_path, dataset.subsets), each scanned with its own
        options; regularization images (DreamBooth) by the training folders' rules."""
        s = self.s
        items = ds_mod.scan_folders(self.image_folders, progress=lambda n: self.check_stop())
        reg_items = [i for i in items if i.is_reg]
        if not reg_items:
            return items
        per_epoch = sum(i.repeats for i in items if not i.is_reg)
        pool = sum(i.repeats for i in reg_items)
        self.log(f"{len(reg_items)} regularization images ({pool} with repeats), cycled to {per_epoch} per epoch; "
                 f"prior loss weight {s.dataset.prior_loss_weight}")
        if pool > per_epoch:
            self.log(f"{pool - per_epoch} regularization sample(s) are never used: there are more than the "
                     f"{per_epoch} training samples per epoch", level="warning")
        return items

    def prepare_data(self) -> None:
        s = self.s
        self.status("Caching latents" if s.dataset.cache_latents != "off" else "Preparing images")
        c = self.components

        @torch.no_grad()
        def encode(pixels: torch.Tensor) -> torch.Tensor:
            return self.arch.encode_latents(c, pixels).float().cpu()

        # latents follow the VAE: the model path and any separate model files (e.g. FLUX's ae.safetensors)
        cache_tag = "-".join([self.arch.id, *self.model_fingerprints])
        self.latent_cache = ds_mod.LatentCache(s.dataset.cache_latents, encode, cache_tag)
        def progress(done: int, total: int) -> None:
            self.check_stop()
            self.status(f"Caching latents {done}/{total}")

        def fill() -> None:
            ds_mod.fill_cache(self.latent_cache, self.items, s.dataset, s.schedule.train_batch_size,
                              progress=progress)
            self.latent_cache.fill(self.val_items, False, s.schedule.train_batch_size)  # measured unflipped

        self.peers.share_latents(self.latent_cache, fill)
        # every worker of a several-process run takes the whole global batch (and its share of the rows)
        self.sampler = ds_mod.BucketBatchSampler(self.items, s.schedule.train_batch_size * self.peers.world,
                                                 s.schedule.seed)
        masks = None
        if s.dataset.masked_loss:
            masks = ds_mod.MaskCache()
            masks.fill(self.items, s.dataset)
        self.data = ds_mod.TrainingDataset(self.items, s.dataset, self.latent_cache, s.schedule.seed, masks,
                                           self.conditioning)
        if s.dataset.cache_latents != "off" and not self.wants_previews():
            c.vae.to("cpu")

    def wants_previews(self) -> bool:
        # rank 0 renders them alone (the other workers keep no text encoders or VAE on the device for them),
        # unless the model is sharded: then its forward pass is a collective, every worker renders, rank 0 writes
        return (self.peers.writes or self.sharded) and self.s.sampling.sample_every_n_steps > 0 \
            and bool(self.prompts())

    def prompts(self) -> list[str]:
        return parse_prompts(self.s.sampling.prompts)

    @torch.no_grad()
    def encode_captions(self, captions: list[str]) -> dict:
        c = self.components
        return self.arch.encode_text(c, self.arch.tokenize(c, captions), self.s.model.clip_skip)

    def open_text_cache(self) -> None:
        """Before loading: the caption embeddings already on disk (which decides whether the text encoders are
        needed at all)."""
        self.text_cache: TextCache | None = None
        self.missing_captions: list[str] = []
        if not self.plan.cache_text_encoder_outputs:
            return
        m = self.s.model
        key = {"arch": self.arch.id, "model": self.model_fingerprints, "clip_skip": m.clip_skip,
               "t5_max_length": m.t5_max_length, "t5_mask": m.apply_t5_attention_mask, "use_t5": m.use_t5,
               "quantized": self.plan.quantize_text_encoder, "dtype": str(self.plan.weight_dtype)}
        folder = self.dataset_root / ds_mod.CACHE_DIR_NAME if self.s.dataset.cache_latents == "disk" else None
        self.text_cache = TextCache("disk" if folder else "memory", folder, key, pin=self.device.type == "cuda")
        captions = sorted({i.caption for i in self.items + self.val_items}
                          | ({""} if self.s.dataset.uses("caption_dropout_rate") else set()))
        self.missing_captions = self.peers.captions_to_encode(self.text_cache.load_existing(captions))
        if len(self.missing_captions) < len(captions):
            self.log(f"Text-encoder outputs of {len(captions) - len(self.missing_captions)} caption(s) read from the "
                     "disk cache")

    def text_encoders_only_for_caching(self) -> bool:
        """The text encoders are needed for caching captions and nothing after (no previews, not trained)."""
        return (self.arch.loads_without_text_encoders and self.text_cache is not None and not self.wants_previews()
                and not self.full_ft and not self.s.network.train_text_encoder)

    def text_encoders_never_needed(self) -> bool:
        return self.text_encoders_only_for_caching() and not self.missing_captions

    def prepare_text(self) -> None:
        c = self.components
        trained = self.full_ft and self.s.network.train_text_encoder
        if not self.plan.cache_text_encoder_outputs:
            self.quantize_text_encoders()
            for te in c.text_encoders:
                te.to(self.device, torch.float32 if trained else self.plan.weight_dtype)
            return
        self.encode_missing_captions()

    def encode_missing_captions(self) -> None:
        missing, self.missing_captions = self.missing_captions, []
        if not missing:
            return
        self.status(f"Caching text-encoder outputs ({len(missing)} captions)")
        with self.text_encoders_on_device(), self.accelerator.autocast():
            for start in range(0, len(missing), 16):
                self.check_stop()
                chunk = missing[start:start + 16]
                cond = self.encode_captions(chunk)
                for j, caption in enumerate(chunk):
                    self.text_cache.add(caption, {k: v[j:j + 1] for k, v in cond.items()})
        if self.text_cache.disk_error:
            self.log(f"Text-encoder outputs are kept in memory only; the disk cache could not be written "
                     f"({self.text_cache.disk_error})", level="warning")
        # cached: the encoders stay in CPU memory (previews bring them back for their prompts only)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def release_text_encoders(self) -> None:
        """With every caption cached and no previews to render, the text encoders are not needed again: they
        are dropped, not just moved, so a 24B encoder does not hold its RAM for the whole run."""
        c = self.components
        if (self.text_cache is None or not c.text_encoders or self.wants_previews() or self.full_ft
                or self.s.network.train_text_encoder):
            return
        freed = sum(t.numel() * t.element_size() for te in c.text_encoders
                    for t in list(te.parameters()) + list(te.buffers()))
        c.text_encoders.clear()
        import gc
        gc.collect()
        self.log(f"Text encoders unloaded after caching ({freed / 2**30:.2f} GB freed)")

    def quantize_text_encoders(self) -> None:
        """The plan's text-encoder quantization, done once, when an encoder is first needed."""
        how = self.plan.quantize_text_encoder
        if self.text_encoders_quantized or how in ("none", "stream") or (
                self.full_ft and self.s.network.train_text_encoder):
            return
        from core.quantize import quantize_frozen
        for te in self.components.text_encoders:
            te.to(dtype=self.plan.weight_dtype)
            report = quantize_frozen(te, how, keep=self.arch.text_encoder_quantize_keep, device=self.device)
            self.log(f"{type(te).__name__} quantized ({how}) for encoding: {report.summary()}")
        self.text_encoders_quantized = True

    def text_encoders_on_device(self) -> contextlib.ExitStack:
        """Every text encoder that is not on the device, brought there (whole, quantized or streamed layer by
        layer, as planned) until the block ends."""
        self.quantize_text_encoders()
        stack = contextlib.ExitStack()
        for te in self.components.text_encoders:
            if not on_device(te, self.device):
                stack.enter_context(text_encoder_on_device(te, self.plan.quantize_text_encoder, self.device,
                                                           self.plan.weight_dtype))
        return stack

    def prepare_network(self) -> None:
        """The trainable: an adapter network patched into the model, (full fine-tuning) the model's own
        parameters, or (textual inversion) a new token's embedding vectors.  All offer parameters / param_groups /
        train / eval / restore / training state.  The plan's memory choices are applied to the denoiser here
        (core.memory_setup)."""
        s, c = self.s, self.components
        self.ema = None
        full = None
        if self.full_ft:
            full = (ShardedFullFineTune if self.sharded else FullFineTune)(c, s.network.train_text_encoder)
            n_params = sum(p.numel() for p in full.parameters())
            self.log(f"Full fine-tune of {', '.join(full.parts)}: {n_params / 1e6:.2f} M trainable "
                     f"parameters (fp32)")
            if self.sharded:  # from CPU memory: each block reaches the device as its shards only
                weights = dict(c.denoiser.state_dict()) if self.peers.writes else None   # rank 0's, broadcast
                blocks = full.shard(self.arch.compile_blocks, self.device, self.plan.mixed_precision == "bf16",
                                    weights)
                del weights
                self.log(f"FSDP: the denoiser's weights, gradients and optimizer state sharded over "
                         f"{self.peers.world} processes ({blocks} blocks gathered as they run)"
                         + ("; only this process read the denoiser, the others received their shards"
                            if self.arch.loads_without_text_encoders else ""))
        trainable = full
        # the new token's vectors, alone (textual inversion) or beside the adapter (pivotal tuning)
        self.embedding = TextualInversion(c, self.arch.embedding_keys, s.network) \
            if self.textual_inversion or self.pivotal else None
        if self.textual_inversion:
            trainable = self.embedding
        elif self.controlnet:
            init_path = self.controlnet_init
            self.status("Building the ControlNet" + (f" from {init_path}" if init_path else " from the UNet"))
            trainable = ControlNetTrainable(self.arch, c, self.arch.build_controlnet(c, init_path), self.device,
                                            self.plan.gradient_checkpointing)
        self.setup = setup_denoiser(self.arch, c, s, self.plan, self.device, self.log, network=trainable)
        self.network = self.setup.network
        if self.full_ft:
            full.swapper = self.setup.swapper
            if s.network.ema:
                # swapped blocks' weights are in CPU memory: so is their average
                on_cpu = s.network.ema_on_cpu or self.setup.swapper is not None
                self.ema = EMA(self.network.named_parameters(), s.network.ema_decay, on_cpu, live=full.live)
                self.log(f"EMA of the weights (decay {s.network.ema_decay}) in "
                         f"{'CPU memory' if self.ema.on_cpu or self.device.type == 'cpu' else 'VRAM'}")
        elif self.textual_inversion or self.controlnet:
            self.log(self.network.summary())
        else:
            n_params = sum(p.numel() for p in self.network.parameters())
            self.log(f"{s.network.algorithm}: {len(self.network.adapters)} layers, {n_params / 1e6:.2f} M "
                     f"trainable parameters")
            if self.pivotal:  # restored with the adapters when the run ends
                self.network = self.setup.network = PivotalTuning(self.network, self.embedding,
                                                                  s.optimizer.embedding_lr)
                self.log("Pivotal tuning: " + self.embedding.summary())
        if s.network.train_text_encoder and not self.textual_inversion:
            if self.plan.gradient_checkpointing:
                for te in c.text_encoders:
                    te.gradient_checkpointing_enable()
            for te in c.text_encoders:
                te.train(True)

    # -- the loop --------------------------------------------------------------------------------------
    def batch_conditioning(self, captions: list[str]) -> dict:
        if self.text_cache is not None:
            return self.text_cache.batch(captions, self.device, self.arch.host_conditioning)
        if self.embedding is not None:  # the token stands for its placeholder tokens, whose rows train
            captions = [self.embedding.placeholders(caption) for caption in captions]
        if self.s.network.train_text_encoder or self.embedding is not None:
            return self.arch.encode_text(self.components, self.arch.tokenize(self.components, captions),
                                         self.s.model.clip_skip)
        return self.encode_captions(captions)

    def step_inputs(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """The batch's latents and text conditioning on the device."""
        if "latents" in batch:
            latents = batch["latents"].to(self.device, non_blocking=True)
        else:
            with torch.no_grad():
                latents = self.arch.encode_latents(self.components, batch["pixels"].to(self.device)).float()
        with self.accelerator.autocast():
            cond = self.batch_conditioning(batch["captions"])
        return latents, cond

    def batch_loss(self, latents: torch.Tensor, cond: dict, batch: dict, autocast=None) -> torch.Tensor:
        with self.setup.step_context():
            return diffusion_loss(self.arch, self.components, latents, cond, batch, self.s, self.plan.weight_dtype,
                                  autocast or self.accelerator.autocast, rows=self.peers.rows(latents.shape[0]))

    def training_step(self, batch: dict) -> torch.Tensor:
        return self.batch_loss(*self.step_inputs(batch), batch)

    def train_loop(self) -> TrainResult:
        s = self.s
        acc = self.accelerator
        params = self.network.param_groups(s.optimizer.learning_rate, s.optimizer.text_encoder_lr)
        self.fused_backward = steps_in_backward(s)
        make = build_fused_backward_optimizer if self.fused_backward else build_optimizer
        if self.setup.optimizer_type != s.optimizer.optimizer_type:
            self.log(f"Optimizer {self.setup.optimizer_type}: the plan keeps the optimizer state in 8 bits")
        o = s.optimizer
        relative_step = o.optimizer_type == "Adafactor" and o.adafactor_relative_step and not self.fused_backward
        optimizer = make(self.setup.optimizer_type, params, o.learning_rate, o.weight_decay, self.device,
                         warmup_steps=o.lr_warmup_steps, relative_step=relative_step,
                         kwargs=optimizer_kwargs(self.setup.optimizer_type, o.beta1, o.beta2, o.eps, o.d_coef))
        batches = len(self.sampler)
        self.total_steps, self.total_epochs = total_steps_and_epochs(s, batches)
        if relative_step:  # Adafactor's own step sizes, reported as its learning rates
            from transformers.optimization import AdafactorSchedule
            lr_scheduler = AdafactorSchedule(optimizer)
        else:
            lr_scheduler = build_scheduler(o.lr_scheduler, optimizer, o.lr_warmup_steps, self.total_steps,
                                           o.lr_scheduler_num_cycles, o.lr_scheduler_power,
                                           o.lr_scheduler_min_lr_ratio, o.lr_decay_steps, o.lr_scheduler_timescale,
                                           o.lr_scheduler_step_rules)
        if self.fused_backward and self.setup.swapper is not None:
            optimizer.after_step = self.setup.swapper.param_updated  # a swapped block's update goes back to RAM
        self.optimizer, self.lr_scheduler = acc.prepare(optimizer, lr_scheduler)

        clipping = s.optimizer.max_grad_norm > 0 and not self.fused_backward
        self.global_step, start_epoch, skip_batches = 0, 0, 0
        self.saved_adapters: list[str] = []
        self.saved_states: list[str] = []
        self.last_good_save: Path | None = None
        self.saved_step = self.state_step = -1  # a step is saved once, whichever rules ask for it
        self.output_stem = None
        if self.resume_dir is not None:
            start_epoch, skip_batches = self.load_state(self.resume_dir)
        # after the resume: it replaces the learning rates, which a captured step keeps as device tensors
        self.captured_step = TrainingStep(self, clipping) if self.plan.cuda_graphs else None
        if self.output_stem is None:
            # a rerun with the same output name never touches an earlier run's files (finished or not)
            self.output_stem = unused_stem(self.output_dir, s.saving.output_name, run=True)
        self.started_at = time.time()
        self.status(f"Training: {self.total_steps} steps, {self.total_epochs} epoch(s), {batches} batches per epoch")

        accumulation = s.schedule.gradient_accumulation_steps
        # fp16 loss scaling meets infinite gradients by design (the scaler skips those steps): only the loss counts
        guard_grad_norm = clipping and self.plan.mixed_precision != "fp16"
        self.guard = DivergenceGuard(self.device, self.global_step)
        first_step = self.global_step
        losses = StepLosses(self.device, s.schedule.log_every_n_steps)
        t0 = time.time()
        epoch = start_epoch
        sf = schedule_free(self.optimizer)
        if sf is not None:
            sf.train()   # its training mode (a state is saved in eval mode)
        trainable = list(self.network.parameters())
        while self.global_step < self.total_steps and epoch < self.total_epochs:
            first = skip_batches if epoch == start_epoch else 0
            for batch_index, indices, batch in prefetched_batches(self.data, self.sampler.batches(epoch)[first:],
                                                                  epoch, first, pin=self.device.type == "cuda"):
                # several workers agree on stopping at report intervals, where they read the device anyway
                if self.peers.stop_agreed(self.stop_event, batch_index % accumulation == 0 and (
                        self.global_step % s.schedule.log_every_n_steps == 0 or self.global_step == first_step)):
                    if self.global_step == first_step:
                        raise TrainingStopped
                    self.log(f"Stopped at step {self.global_step}; saving")
                    self.result.stopped = True
                    return self.finish()
                if self.captured_step is not None:   # the whole step, replayed from a CUDA graph (one batch)
                    loss, grad_norm = self.captured_step(batch)
                    losses.add(loss)
                else:
                    group_size, steps_now = accumulation_group(batch_index, batches, accumulation)
                    with contextlib.nullcontext() if steps_now else acc.no_sync(self.network):
                        loss = self.training_step(batch)
                        acc.backward(loss / group_size)
                    losses.add(loss)
                    if not steps_now:
                        continue
                    self.peers.sum_gradients(trainable, losses)
                    grad_norm = None
                    if clipping:
                        grad_norm = self.network.clip_gradients(s.optimizer.max_grad_norm) if self.sharded else \
                            acc.clip_grad_norm_(self.network.parameters(), s.optimizer.max_grad_norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                self.lr_scheduler.step()
                losses.step()
                self.guard.update(losses.total, grad_norm if guard_grad_norm else None)
                self.global_step += 1
                if self.ema is not None:
                    self.ema.update()
                self.position = (epoch, batch_index + 1) if batch_index + 1 < batches else (epoch + 1, 0)
                last = self.global_step >= self.total_steps
                if self.global_step % s.schedule.log_every_n_steps == 0 or last:
                    self.report(epoch, losses, t0, first_step)
                every = s.schedule.validate_every_n_steps
                if self.val_items and (last or (every and self.global_step % every == 0)):
                    self.validate(epoch)
                if self.wants_previews() and self.global_step % s.sampling.sample_every_n_steps == 0:
                    self.preview()
                if not last and s.saving.save_every_n_steps and self.global_step % s.saving.save_every_n_steps == 0:
                    self.save(final=False)
                if last:
                    break
            if self.val_items and not s.schedule.validate_every_n_steps and self.validated_at != self.global_step:
                self.validate(epoch)
            epoch += 1
            if self.global_step < self.total_steps and s.saving.save_every_n_epochs \
                    and epoch % s.saving.save_every_n_epochs == 0:
                self.position = (epoch, 0)
                self.save(final=False)
        return self.finish()

    def check_finite(self) -> None:
        """Stop the run (TrainingDiverged) if any step so far had a non-finite loss or gradient norm."""
        bad = self.guard.first_bad()
        if bad is not None:
            self.diverged(*bad)

    def diverged(self, step: int, what: str) -> None:
        o = self.s.optimizer
        clipping = f"max_grad_norm {o.max_grad_norm:g}" if o.max_grad_norm > 0 else "off"
        adapter, state = self.last_good_save, self.result.state_dir  # a resumed run starts from its state
        if adapter is not None or state is not None:
            saved = f"{adapter} (resumable state {state})" if adapter and state else f"{adapter or state}"
            last = (f"The last good save is {saved}; nothing after it was written. Lower the learning rate or turn "
                    "on clipping (optimizer.max_grad_norm), then "
                    + ("resume from that state." if state is not None else "train again."))
        else:
            last = ("Nothing was saved before it. Lower the learning rate or turn on clipping "
                    "(optimizer.max_grad_norm) and start again.")
        raise TrainingDiverged(f"{what} near step {step} (learning rate {o.learning_rate:g}, gradient clipping "
                               f"{clipping}). {last}")

    def report(self, epoch: int, losses: StepLosses, t0: float, step0: int) -> None:
        from core.hardware import current_memory_use
        loss, per_step = losses.read()  # the one read of the device per report
        self.check_finite()
        elapsed = time.time() - t0
        done = self.global_step - step0
        rate = done / elapsed if elapsed > 0 else 0.0
        mem = current_memory_use()
        emit(self.on_event, "progress", step=self.global_step, total_steps=self.total_steps, epoch=epoch + 1,
             total_epochs=self.total_epochs, loss=loss,
             step_losses=[(self.global_step - len(per_step) + i + 1, v) for i, v in enumerate(per_step)],
             lrs=[float(x) for x in self.lr_scheduler.get_last_lr()],
             lr=float(self.lr_scheduler.get_last_lr()[0]), elapsed_s=elapsed,
             eta_s=(self.total_steps - self.global_step) / rate if rate > 0 else None, it_per_s=rate,
             vram_gb=mem.get("vram_gb"), ram_gb=mem.get("ram_gb"))

    # -- validation loss -------------------------------------------------------------------------------
    #: noise levels per held-out image, spread evenly over the trained range
    VALIDATION_LEVELS = 4
    validated_at = -1

    def validate(self, epoch: int) -> None:
        with self.eval_weights():
            self._validate(epoch)

    def _validate(self, epoch: int) -> None:
        """The validation loss: every held-out image at fixed noise levels with fixed noise (drawn from
        dataset.validation_seed on the CPU, never from the training's random streams), unflipped, its caption as
        written, the adapters' dropout off; one device read for the whole measurement.  Several workers each
        measure their share of the images and add up their sums."""
        s, c = self.s, self.components
        lo, hi = timestep_range(s.schedule.min_timestep, s.schedule.max_timestep)
        k = self.VALIDATION_LEVELS
        levels = [lo + (hi - lo) * (j + 0.5) / k for j in range(k)]
        use_cache = s.dataset.cache_latents != "off"
        total = torch.zeros((), device=self.device)
        c.denoiser.eval()
        self.network.eval()
        try:
            with torch.no_grad():
                for (n, item), weight in self.peers.share_of(list(enumerate(self.val_items)), self.sharded):
                    if use_cache:
                        latents = self.latent_cache.get(item, False)[None].to(self.device)
                    else:
                        pixels = ds_mod.load_image(item.path, item.bucket)[0][None]
                        latents = self.arch.encode_latents(c, pixels.to(self.device)).float()
                    _, _, top, left = ds_mod.crop_geometry(item.width, item.height, item.bucket)
                    batch = {"captions": [item.caption], "original_sizes": [(item.height, item.width)],
                             "crop_coords": [(top, left)], "target_sizes": [item.bucket[::-1]]}
                    if self.conditioning is not None:
                        batch["conditioning"] = self.conditioning.get(item, False)[None]
                    with self.accelerator.autocast():
                        cond = self.batch_conditioning([item.caption])
                    gen = torch.Generator().manual_seed(s.dataset.validation_seed * 100_003 + n)
                    for level in levels:
                        noise = torch.randn(latents.shape, generator=gen).to(self.device)
                        with self.setup.step_context():
                            total += weight * diffusion_loss(
                                self.arch, c, latents, cond, batch, s, self.plan.weight_dtype,
                                self.accelerator.autocast, fixed=(noise, torch.tensor([level], device=self.device)))
        finally:
            c.denoiser.train()
            self.network.train()
        loss = float(self.peers.total(total).item()) / (len(self.val_items) * k)   # its one device read
        self.validated_at = self.global_step
        self.validation_history.append((self.global_step, loss))
        self.result.validation = list(self.validation_history)
        emit(self.on_event, "validation", step=self.global_step, epoch=epoch + 1, loss=loss)

    # -- previews --------------------------------------------------------------------------------------
    def preview(self) -> None:
        with self.status_while(f"Preview images at step {self.global_step}"), self.eval_weights(), \
                self.peers.own_random_streams():
            self._preview()

    def _preview(self) -> None:
        s, c = self.s, self.components
        prompts = self.prompts()
        # a ControlNet's previews: the held-out images' conditioning images, else the training images'
        control = self.conditioning.preview_images(self.val_items or self.items, len(prompts)) \
            if self.conditioning is not None else None
        self.check_finite()
        c.denoiser.eval()
        self.network.eval()  # no adapter dropout in previews
        try:
            with contextlib.ExitStack() as stack, torch.no_grad():
                if not on_device(c.vae, self.device):
                    c.vae.to(self.device)
                    stack.callback(c.vae.to, "cpu")
                stack.enter_context(self.text_encoders_on_device())
                images = []
                for i, p in enumerate(prompts):  # one at a time: Stop skips the prompts still to render
                    if self.stop_event.is_set() and not self.sharded:  # (sharded: the workers render together)
                        break
                    # the seed render_each gives prompt i, unless the line sets one; then the line's options
                    sampling = s.sampling.model_copy(update={"seed": s.sampling.seed + i, **p.overrides})
                    prompt = p.prompt
                    if self.embedding is not None:  # the token stands for its placeholder tokens here too
                        prompt = self.embedding.placeholders(prompt)
                        sampling.negative_prompt = self.embedding.placeholders(sampling.negative_prompt)
                    size = (sampling.width or s.dataset.resolution, sampling.height or s.dataset.resolution)
                    images += self.arch.sample(c, [prompt], s.model_copy(update={"sampling": sampling}), size,
                                               self.device, self.plan.weight_dtype,
                                               **({"conditioning": control[i]} if control else {}))
        finally:
            c.denoiser.train()
            self.network.train()
        if not self.peers.writes:
            return
        paths = []
        for i, image in enumerate(images):
            path = self.output_dir / "samples" / f"{self.output_stem}-step{self.global_step:06d}-{i}.png"
            paths.append(str(atomic_save_image(path, image)))
        self.result.samples.extend(Path(p) for p in paths)
        emit(self.on_event, "sample", step=self.global_step, paths=paths,
             prompts=[p.prompt for p in prompts[:len(paths)]])

    # -- saving and resuming ---------------------------------------------------------------------------
    def metadata(self, tensors_hash: str, suffix: str = "") -> dict:
        # training folders only: regularization images count neither as training images nor in the tag
        # frequency (they are reported separately as ss_num_reg_images / ss_prior_loss_weight)
        train_items = [i for i in self.items if not i.is_reg]
        by_folder: dict[str, list[str]] = {}
        for item in train_items:
            by_folder.setdefault(item.path.parent.name, []).append(item.caption)
        res = self.s.dataset.resolution
        epoch = getattr(self, "position", (0, 0))[0]
        n_reg = len(self.items) - len(train_items)
        reg_md = {"ss_num_reg_images": str(n_reg), "ss_prior_loss_weight": str(self.s.dataset.prior_loss_weight)} \
            if n_reg else {}
        md = adapter_metadata(self.arch, self.s, steps=self.global_step, epoch=epoch,
                              num_images=len(train_items), tag_freq=tag_frequency(by_folder),
                              model_name=self.model_path.name, started_at=self.started_at,
                              mixed_precision=self.plan.mixed_precision, resolution=(res, res),
                              tensors_hash=tensors_hash) | reg_md | self.arch.adapter_metadata(self.s, suffix)
        if self.controlnet:
            return controlnet_metadata(md, self.arch)
        embedding_file = self.textual_inversion or suffix == EMBEDDING_FILE_SUFFIX
        return embedding_metadata(md, self.arch, self.s) if embedding_file else md

    @contextlib.contextmanager
    def eval_weights(self):
        """A schedule-free optimizer's averaged weights in the model for a save, preview or validation, its
        training weights back afterwards; nothing to do for other optimizers."""
        sf = schedule_free(getattr(self, "optimizer", None))
        if sf is None:
            yield
            return
        sf.eval()
        try:
            yield
        finally:
            sf.train()

    def save(self, final: bool) -> Path:
        with self.eval_weights():
            return self._save(final)

    def _save(self, final: bool) -> Path:
        """The adapter (or checkpoint) and, when asked, the resumable state.  Nothing is written once a loss,
        gradient norm or weight is not finite: the run stops (TrainingDiverged) and the earlier saves stay."""
        if not final and self.saved_step == self.global_step:
            return self.last_good_save  # the step rule and the epoch rule both asked for this step
        self.check_finite()
        with_state = self.s.saving.save_state and self.state_step != self.global_step
        # a sharded model's weights and optimizer state come to rank 0 in a collective of every worker
        optimizer_state = self.network.gather(self.optimizer, with_state) if self.sharded else \
            self.optimizer.state_dict() if with_state and self.peers.writes else None
        if not self.peers.writes:
            self.peers.wait_for_save()  # rank 0 writes; no worker runs ahead of it
            self.saved_step = self.global_step
            if with_state:
                self.state_step = self.global_step
            return None
        what = ("checkpoint" if self.full_ft else "embedding" if self.textual_inversion else
                "ControlNet" if self.controlnet else "adapter") + (
            " and the resumable state" if with_state else "")
        needed = self.save_bytes(optimizer_state)
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            if shutil.disk_usage(self.output_dir).free < needed:
                raise OSError(errno.ENOSPC, "not enough free space for this save")
            path = self.save_checkpoint(final) if self.full_ft else self.save_adapter(final)
            self.saved_step = self.global_step
            if with_state:
                self.save_state(optimizer_state)
        except NonFiniteError as exc:
            self.diverged(self.global_step, f"The weights became NaN or infinite ({exc})")
        except OSError as exc:
            self.save_failed(exc, what, needed)
        self.last_good_save = path
        if self.sharded:
            self.network.release_gathered()
        self.peers.saved()
        return path

    def save_bytes(self, optimizer_state: dict | None) -> int:
        """About what a save writes: the file(s) in the save precision, plus (with ``optimizer_state``: a
        resumable state) the fp32 weights, that optimizer state and the EMA; with room for headers."""
        elem = SAVE_DTYPES[self.s.saving.save_precision].itemsize
        trained = sum(p.numel() for p in self.network.parameters())
        c = self.components
        saved = sum(p.numel() for m in [c.denoiser, c.vae, *c.text_encoders] for p in m.parameters()) \
            if self.full_ft else trained
        total = saved * elem
        if optimizer_state is not None:
            total += trained * 4 + sum(t.numel() * t.element_size()
                                       for t in optimizer_tensors(optimizer_state).values())
            if self.ema is not None:
                total += trained * 4
        return int(total * 1.05) + 2**16

    def save_failed(self, exc: OSError, what: str, needed: int) -> None:
        folder = self.output_dir
        try:
            free = f"{shutil.disk_usage(folder).free / 2**20:.1f} MB free"
        except OSError:
            free = "free space unknown"
        reason, action = {
            errno.ENOSPC: (f"No space left on {folder}", "free space"),
            errno.EDQUOT: (f"The disk quota is used up on {folder}", "free space"),
            errno.EROFS: (f"{folder} is read-only", "make it writable"),
            errno.EACCES: (f"No permission to write in {folder}", "make it writable"),
            errno.EPERM: (f"No permission to write in {folder}", "make it writable"),
        }.get(exc.errno, (f"Writing to {folder} failed ({exc.strerror or exc})", "fix that"))
        state = self.result.state_dir
        then = (f"the last good state is {state} — {action} and press Resume." if state is not None else
                f"no resumable state was saved before — {action} and start again.")
        raise SaveFailed(f"{reason} while saving the {what} at step {self.global_step} (needs ≈"
                         f"{needed / 2**20:.1f} MB, {free}). Training stopped; {then}") from exc

    def save_name(self, final: bool) -> str:
        """The file name of a save: ``<stem>.safetensors`` at the end, ``<stem>-step<N>.safetensors`` on the way
        and at the end of a resumed run whose earlier final file exists (never replaced); ``-1``, ``-2`` … when
        even that is taken (a run resumed from an older state)."""
        stem = f"{self.output_stem}-step{self.global_step:06d}"
        if final and unused_stem(self.output_dir, self.output_stem) == self.output_stem:
            stem = self.output_stem
        return unused_stem(self.output_dir, stem) + ".safetensors"

    def save_adapter(self, final: bool) -> Path:
        s = self.s
        name = self.save_name(final)
        # the family may write more than one file (e.g. SD3: kohya layout + <name>.diffusers.safetensors); an
        # embedding's and a ControlNet's tensors are written as they are; pivotal tuning adds the embedding
        paths = save_adapter_files(self.output_dir / name, self.network, self.metadata, s.saving.save_precision,
                                   None if self.textual_inversion or self.controlnet else self.adapter_files)
        path = paths[0]
        if self.controlnet and s.saving.save_diffusers_folder:
            paths.append(save_controlnet_folder(self.network.module, unused_path(
                path.with_name(path.stem + "_diffusers")), SAVE_DTYPES[s.saving.save_precision]))
        for p in paths:
            emit(self.on_event, "saved", step=self.global_step, path=str(p), kind="adapter")
        self.result.outputs.extend(paths)
        if not final:
            self.saved_adapters.append(name)
            self.prune(self.saved_adapters, self.delete_adapter)
        return path

    def adapter_files(self, tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """The family's adapter file(s) for the network's tensors; with pivotal tuning, the embedding too."""
        files = self.arch.export_adapter(self.components, tensors)
        if self.pivotal:
            files = self.network.with_embedding(files, self.arch.embedding_bundle_names,
                                                SAVE_DTYPES[self.s.saving.save_precision])
        return files

    def save_checkpoint(self, final: bool) -> Path:
        """Full fine-tuning: the whole model (EMA weights when on) in the family's original single-file layout,
        plus a diffusers folder when asked.  Never overwrites an existing file."""
        s = self.s
        dtype = SAVE_DTYPES[s.saving.save_precision]
        state_dicts = self.network.module_state_dicts(self.ema)
        path = self.output_dir / self.save_name(final)
        meta = {"ss_training_steps": str(self.global_step), "ss_base_model_version": self.arch.ss_base_model_version,
                "ss_output_name": s.saving.output_name, "ss_ema": str(self.ema is not None),
                "ss_training_comment": "full fine-tune"}
        self.arch.save_full_checkpoint(self.components, path, dtype, state_dicts, meta)
        paths = [path]
        if s.saving.save_diffusers_folder:
            folder = unused_path(path.with_name(path.stem + "_diffusers"))
            paths.append(self.arch.save_diffusers_folder(self.components, folder, dtype, state_dicts))
        for p in paths:
            emit(self.on_event, "saved", step=self.global_step, path=str(p), kind="checkpoint")
        self.result.outputs.extend(paths)
        if not final:
            self.saved_adapters.append(path.name)
            self.prune(self.saved_adapters, self.delete_adapter)
        return path

    def delete_adapter(self, name: str) -> None:
        """An intermediate save: its main file and the family's extra files (``<stem>.<suffix>.safetensors``)."""
        main = self.output_dir / name
        removed = [main, *self.output_dir.glob(f"{main.stem}.*.safetensors"),
                   main.with_name(main.stem + EMBEDDING_FILE_SUFFIX + main.suffix)]
        for p in removed:
            p.unlink(missing_ok=True)
        if self.full_ft or self.controlnet:
            removed.append(main.with_name(main.stem + "_diffusers"))
            shutil.rmtree(removed[-1], ignore_errors=True)
        # what lists the run's files (the result, the Run tab) no longer names them
        gone = {str(p) for p in removed}
        self.result.outputs = [p for p in self.result.outputs if str(p) not in gone]
        emit(self.on_event, "deleted", paths=sorted(gone),
             reason=f"keeping the last {self.s.saving.save_last_n} intermediate saves")

    def prune(self, names: list[str], delete) -> None:
        keep = self.s.saving.save_last_n
        while keep and len(names) > keep:
            delete(names.pop(0))

    def save_state(self, optimizer_state: dict) -> None:
        """Everything needed to continue exactly: adapter weights in fp32, optimizer, scheduler, position, RNG."""
        final_dir = unused_path(self.output_dir / f"{self.output_stem}{STATE_INFIX}{self.global_step:06d}")
        name = final_dir.name
        tmp = self.output_dir / f".{name}.tmp"
        weights = {"model.safetensors" if self.full_ft else "adapter.safetensors": self.network.training_state_dict()}
        if self.full_ft and self.ema is not None:  # the trained model's fp32 weights and their average
            weights["ema.safetensors"] = self.ema.state_dict()
        check_finite(optimizer_tensors(optimizer_state), "optimizer state")
        shutil.rmtree(tmp, ignore_errors=True)
        try:  # written into a hidden folder that is moved into place whole, or removed
            tmp.mkdir(parents=True)
            for file_name, tensors in weights.items():
                atomic_save_safetensors(tmp / file_name, tensors)
            atomic_torch_save(tmp / "optimizer.pt", optimizer_state)
            atomic_torch_save(tmp / "scheduler.pt", self.lr_scheduler.state_dict())
            rng = {"cpu": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state_all()
            atomic_torch_save(tmp / "rng.pt", rng)
            epoch, batch_index = getattr(self, "position", (0, 0))
            atomic_write_json(tmp / "train_state.json", {
                "global_step": self.global_step, "epoch": epoch, "batch_in_epoch": batch_index,
                "output_stem": self.output_stem, "saved_adapters": self.saved_adapters,
                "saved_states": [*self.saved_states, name],
                "architecture": self.arch.id, "network": self.s.network.model_dump(mode="json"),
                "strategy": self.s.distributed.strategy, "processes": self.peers.world,
                "validation": self.validation_history})
            os.replace(tmp, final_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.saved_states.append(name)
        self.state_step = self.global_step
        self.result.state_dir = final_dir
        emit(self.on_event, "saved", step=self.global_step, path=str(final_dir), kind="state")
        self.prune(self.saved_states, lambda n: shutil.rmtree(self.output_dir / n, ignore_errors=True))

    def load_state(self, state_dir: Path) -> tuple[int, int]:
        """Continue the run that wrote ``state_dir`` (checked by ``check_resume`` before loading)."""
        from safetensors.torch import load_file
        info = self.resume_info
        # a sharded run reads the full state on rank 0 into CPU memory and sends each worker its shards
        device = torch.device("cpu") if self.sharded else self.device
        reads = not self.sharded or self.peers.writes
        if self.full_ft:
            self.network.load_training_state_dict(load_file(str(state_dir / "model.safetensors"),
                                                            device=str(device)) if reads else None)
            if self.ema is not None:
                self.ema.load_state_dict(load_file(str(state_dir / "ema.safetensors")))
        else:
            self.network.load_export_state_dict(load_file(str(state_dir / "adapter.safetensors")))
        optimizer_state = torch.load(state_dir / "optimizer.pt", weights_only=True, map_location=device) \
            if reads else None
        if self.sharded:  # every worker keeps its shard of the full state
            self.network.load_optimizer_state_dict(self.optimizer, optimizer_state)
        else:
            self.optimizer.load_state_dict(optimizer_state)
        self.lr_scheduler.load_state_dict(torch.load(state_dir / "scheduler.pt", weights_only=True))
        self.apply_learning_rates()
        self.result.state_dir = state_dir
        rng = torch.load(state_dir / "rng.pt", weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            self.peers.set_cuda_rng_states(rng["cuda"])
        self.global_step = info["global_step"]
        self.output_stem = info["output_stem"]
        self.saved_adapters = list(info["saved_adapters"])
        # keep-last-K goes on counting the states written before the resume (older states name none)
        self.saved_states = [n for n in info.get("saved_states", [state_dir.name])
                             if (self.output_dir / n).is_dir()]
        self.state_step = self.saved_step = self.global_step
        # the validation curve so far, for the chart and the logs of this run
        self.validation_history = [(int(st), float(v)) for st, v in info.get("validation", [])]
        self.result.validation = list(self.validation_history)
        for st, v in self.validation_history:
            emit(self.on_event, "validation", step=st, loss=v, resumed=True)
        self.log(f"Resumed from {state_dir} at step {self.global_step}")
        return info["epoch"], info["batch_in_epoch"]

    def apply_learning_rates(self) -> None:
        """A resumed run uses the learning rates of its settings, not the saved run's (a run that diverged is
        resumed with a lower one): the schedule's base rates are replaced and the current rate recomputed."""
        s = self.s
        scheduler = self.lr_scheduler.scheduler
        wanted = [group["lr"] for group in self.network.param_groups(s.optimizer.learning_rate,
                                                                     s.optimizer.text_encoder_lr)]
        lambdas = getattr(scheduler, "lr_lambdas", None)
        if lambdas is None or len(wanted) != len(scheduler.base_lrs) or list(scheduler.base_lrs) == wanted:
            return
        self.log(f"Learning rate {', '.join(f'{lr:g}' for lr in wanted)} (the saved run used "
                 f"{', '.join(f'{lr:g}' for lr in scheduler.base_lrs)})")
        scheduler.base_lrs = wanted
        for group, base, factor in zip(self.optimizer.param_groups, wanted, lambdas):
            group["initial_lr"] = base
            group["lr"] = base * factor(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def finish(self) -> TrainResult:
        self.status("Saving")
        final = self.save(final=True)
        self.result.final = final
        self.result.steps = self.global_step
        peak = torch.cuda.max_memory_allocated() / 2**30 if self.device.type == "cuda" else None
        self.release()
        emit(self.on_event, "done", outputs=[str(p) for p in self.result.outputs], final=str(final),
             stopped=self.result.stopped, peak_vram_gb=peak)
        self.status("Stopped" if self.result.stopped else "Finished")
        return self.result
