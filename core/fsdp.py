"""FSDP: a full fine-tune whose denoiser is sharded over the worker processes (``distributed.strategy`` fsdp).

Each worker holds 1/N of the denoiser's fp32 master weights, of their gradients and of the optimizer state;
a block's whole weights exist only while it runs (torch's FSDP2 ``fully_shard``: one unit per repeated block,
the family's ``compile_blocks``, then the root for the rest).  In bf16 precision (the plan's choice on CUDA)
the gathered weights are bf16 (``MixedPrecisionPolicy``) and gradients are reduced in fp32.  Everything else
of a several-process run is DDP's (core.distributed): the same global batch and random streams on every
worker, each worker's rows, its loss the sum of its rows' over the global row count.  The backward pass
reduce-scatters each gradient as a sum (no division by N: :meth:`ShardedFullFineTune.shard`), so each worker
ends with its shard of what one process with the whole batch computes; ``Peers.sum_gradients`` then sums only
what is not sharded (trained text encoders, the step's loss).

Saving.  Gathering the weights is a collective: every worker calls :meth:`ShardedFullFineTune.gather` at every
save, rank 0 receives the full state dicts in CPU memory and writes them exactly as a one-process run does
(the family's single file, the fp32 training weights).  The optimizer state is gathered too, as a full state
dict keyed by parameter name (``torch.distributed.checkpoint``'s layout, not ``Optimizer.state_dict``'s
numbered one), written by rank 0 as ``optimizer.pt``; a resume reads it on every worker and each keeps its
shard.  So a state holds no trace of the sharding, but its position in the data counts global batches of
N × the batch size: a resume on another number of processes is refused (:func:`resume_problems`), as is one
of a state of another strategy (the optimizer files differ).

Not combined with FSDP (refused, :func:`fsdp_problems`): adapters (a few MB of weights: DDP is right), one
process, EMA (its average would need sharding and gathering of its own), block swapping (it moves whole
weights), the fused backward pass (refused for every several-process run), fp16 (its loss scaling does not
handle sharded gradients; the plan refuses it where 'auto' would pick it), 8-bit optimizer state, Adafactor and
CAME (factored statistics).  The plan turns compile off (not verified with FSDP).

Loading.  Rank 0 alone reads the denoiser's weights; in families that can load without it
(``Architecture.loads_without_text_encoders``: SD3, FLUX.1, FLUX.2) the other workers build it empty on the meta
device from its config and receive their shards from rank 0 (``broadcast_from_rank0``), so the fp32 model is in
one process's RAM, not N.  A resume reads the saved weights and optimizer state on rank 0 and broadcasts them the
same way.

Validation runs the same number of forward passes on every worker (the sharded forward is a collective:
``Peers.share_of(…, same_count=True)``); previews are rendered by every worker and written by rank 0."""
from __future__ import annotations

import torch
from torch import nn

from core.full_finetune import FULL_FINETUNE, FullFineTune

FSDP = "fsdp"
#: optimizers whose step fails on sharded parameters (measured: two processes against one on tiny FLUX.1; AdamW,
#: Lion, Prodigy, DAdaptAdam, AdamWScheduleFree and SGD match within 2.2e-06, with accumulation too)
FACTORED_OPTIMIZERS = ("Adafactor", "CAME")


def fsdp_problems(settings, processes: int) -> list[str]:
    """Why ``distributed.strategy`` fsdp cannot train this run on ``processes`` processes (0: one per GPU, not
    known yet); empty when it can or when the strategy is DDP."""
    if settings.distributed.strategy != FSDP:
        return []
    n = settings.network
    where = "(Distributed → Strategy)"
    if n.algorithm != FULL_FINETUNE:
        return [f"distributed.strategy fsdp shards a full fine-tune's weights; network.algorithm is {n.algorithm}, "
                f"whose few trained weights every process holds whole: choose DDP {where}"]
    out = []
    if processes == 1:
        out.append(f"distributed.strategy fsdp shards the model over several processes; this run has one: set "
                   f"distributed.num_processes to 2 or more (0: one per GPU), or choose DDP {where}")
    if n.ema:
        out.append(f"network.ema is not available with distributed.strategy fsdp (the average would be sharded "
                   f"too): turn EMA off (Network tab), or choose DDP {where}")
    if settings.memory.blocks_to_swap > 0:
        out.append(f"memory.blocks_to_swap ({settings.memory.blocks_to_swap}) cannot swap sharded blocks: set it "
                   f"to 0 or -1 (auto), or choose DDP {where}")
    if settings.memory.optimizer_8bit == "on" or settings.optimizer.optimizer_type.endswith("8bit"):
        out.append(f"8-bit optimizer state (bitsandbytes) is not available with distributed.strategy fsdp: choose "
                   f"a 32-bit optimizer and memory.optimizer_8bit 'auto' or 'off', or DDP {where}")
    if settings.memory.mixed_precision == "fp16":
        out.append(f"memory.mixed_precision fp16 is not available with distributed.strategy fsdp (its loss "
                   f"scaling does not handle sharded gradients): choose bf16 or no (Memory tab), or DDP {where}")
    if settings.optimizer.optimizer_type in FACTORED_OPTIMIZERS:
        out.append(f"optimizer.optimizer_type {settings.optimizer.optimizer_type} keeps factored statistics that "
                   f"cannot be sharded (its step mixes whole and sharded tensors): choose AdamW, Lion, Prodigy, "
                   f"DAdaptAdam, AdamWScheduleFree or SGD (Optimizer tab), or DDP {where}")
    return out


def resume_problems(info: dict, settings, processes: int) -> list[str]:
    """Why the state described by ``info`` (its train_state.json) cannot be continued with this strategy on
    ``processes`` processes.  States written before the strategy was recorded are DDP states; those written
    before the process count was recorded continue on any count (as they did).  A state's position counts
    global batches (batch size × processes), so a DDP state too continues only on its own count."""
    saved = info.get("strategy", "ddp")
    ours = settings.distributed.strategy
    if saved != ours:
        return [f"saving.resume_from: that state was trained with distributed.strategy {saved}, whose optimizer "
                f"state differs from {ours}'s: choose {saved} (Distributed → Strategy), or start a new run"]
    if info.get("processes", processes) != processes:
        return [f"saving.resume_from: that state was trained on {info['processes']} processes; this run has "
                f"{processes}, which would change the global batch the state's position counts: set "
                f"distributed.num_processes to {info['processes']} (Distributed tab), or start a new run"]
    return []


def fsdp_blocks(denoiser: nn.Module, block_names: tuple[str, ...]) -> list[nn.Module]:
    """The denoiser's repeated blocks (the modules whose class is one of the family's ``compile_blocks``), each
    a unit whose weights are gathered while it runs."""
    return [m for m in denoiser.modules() if type(m).__name__ in block_names]


class ShardedFullFineTune(FullFineTune):
    """A full fine-tune whose denoiser is sharded with FSDP2 (see the module docstring).  Its parameters are
    DTensors: the optimizer steps on each worker's shards."""

    def __init__(self, components, train_text_encoder: bool):
        super().__init__(components, train_text_encoder)
        #: the full state dict of the last :meth:`gather` (rank 0; empty on the others and after the save)
        self.gathered: dict[str, torch.Tensor] = {}

    def shard(self, block_names: tuple[str, ...], device: torch.device, bf16: bool,
              weights: dict[str, torch.Tensor] | None) -> int:
        """Shard the denoiser over every worker of the process group, block by block, from CPU memory (each
        block reaches the device as shards), with ``weights`` (rank 0: the denoiser's full state dict; None on
        the others, whose denoiser may be an empty one on the meta device) as every worker's shards.  Returns
        the number of blocks."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
        # the inputs are left as they come (the timesteps in fp32, the blocks' residual stream as autocast
        # leaves it): only the gathered weights are bf16, which autocast would cast them to anyway
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                      cast_forward_inputs=False) if bf16 else MixedPrecisionPolicy()
        denoiser = self.parts["denoiser"]
        blocks = fsdp_blocks(denoiser, block_names)
        if not blocks:
            raise ValueError(f"no block of types {block_names} found to shard")
        for module in [*blocks, denoiser]:
            fully_shard(module, mesh=mesh, mp_policy=policy)
            # each worker's loss is its share of the global batch's: gradients are summed, not averaged (a
            # divide factor of 1 with sum-only collectives, which gloo supports too)
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
        if any(p.is_meta for p in denoiser.parameters()):
            denoiser.to_empty(device="cpu")
        set_model_state_dict(denoiser, weights or {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        return len(blocks)

    def modules(self) -> nn.ModuleDict:
        """The trained parts under the names of :meth:`named_parameters` ("denoiser.…", "te0.…")."""
        return nn.ModuleDict(self.parts)

    # -- the step --------------------------------------------------------------------------------------
    @torch.no_grad()
    def clip_gradients(self, max_norm: float) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over sharded and whole gradients: the shards' squared norms are
        summed over the workers (the whole ones are already the same everywhere).  Returns the total norm."""
        from torch.distributed.tensor import DTensor
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        shards = [g.to_local() for g in grads if isinstance(g, DTensor)]
        whole = [g for g in grads if not isinstance(g, DTensor)]
        squared = torch.stack(torch._foreach_norm(shards)).square().sum()
        torch.distributed.all_reduce(squared)
        if whole:
            squared = squared + torch.stack(torch._foreach_norm(whole)).square().sum()
        total = squared.sqrt()
        torch._foreach_mul_(shards + whole, torch.clamp(max_norm / (total + 1e-6), max=1.0))
        return total

    # -- saving and resuming ---------------------------------------------------------------------------
    def gather(self, optimizer, with_state: bool) -> dict | None:
        """Called by every worker at every save: the full weights (and, ``with_state``, the optimizer's full
        state, returned) come to rank 0's CPU memory; the others receive nothing."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        self.gathered = get_model_state_dict(self.modules(), options=full)
        if not with_state:
            return None
        return get_optimizer_state_dict(self.modules(), _torch_optimizer(optimizer), options=full)

    def release_gathered(self) -> None:
        """After a save: the gathered copy (the whole model in rank 0's CPU memory) is not kept for the run."""
        self.gathered = {}

    def module_state_dicts(self, ema=None) -> dict[str, dict[str, torch.Tensor]]:
        """Each part's full state dict from the last :meth:`gather` (rank 0)."""
        out: dict[str, dict[str, torch.Tensor]] = {part: {} for part in self.parts}
        for key, value in self.gathered.items():
            part, name = key.split(".", 1)
            out[part][name] = value
        return out

    def training_state_dict(self) -> dict[str, torch.Tensor]:
        names = {name for name, _ in self.named_parameters()}
        return {k: v.contiguous() for k, v in self.gathered.items() if k in names}

    def load_training_state_dict(self, sd: dict[str, torch.Tensor] | None) -> None:
        """Rank 0 reads the full weights (``sd``; None on the others) and every worker receives its shards."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        if sd is not None:
            names = {name for name, _ in self.named_parameters()}
            missing, unexpected = names - sd.keys(), sd.keys() - names
            if missing or unexpected:
                raise ValueError(f"saved model weights do not fit this model: {len(missing)} missing, "
                                 f"{len(unexpected)} unexpected (e.g. {sorted(missing | unexpected)[:3]})")
        set_model_state_dict(self.modules(), sd or {},
                             options=StateDictOptions(full_state_dict=True, strict=False, broadcast_from_rank0=True))

    def load_optimizer_state_dict(self, optimizer, state: dict | None) -> None:
        """Rank 0 reads the full optimizer state (``state``; None on the others), every worker keeps its shard."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(self.modules(), _torch_optimizer(optimizer), state or {},
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def _torch_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's wrapper (the state-dict functions read its parameters)."""
    return getattr(optimizer, "optimizer", optimizer)

