"""Block swapping (core/block_swap.py) in simulate mode: the CPU is both the compute and the offload device, but
the same hooks, slots, placeholders, prefetch and saved-tensor references run as on CUDA.  Offloaded weights are
zero-element placeholders, so a block used while not resident fails (test_non_resident_block_is_detected), and
slots are reused, so a stale saved weight gives wrong gradients (test_saved_weights_need_the_references)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from core.adapters.lora import LoRAModule
from core.activation_offload import offload_activations
from core.block_swap import BlockSwapper, collect_blocks, swap_blocks_of
from core.layer_stream import stream_layers

CPU = torch.device("cpu")


# -- a small transformer-like stack with LoRA ------------------------------------------------------------

class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)
        self.register_buffer("gate", torch.rand(d) + 0.5)

    def forward(self, x, context=None):
        h = self.norm1(x)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        a = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(a) * self.gate
        x = x + self.fc2(F.gelu(self.fc1(self.norm2(x))))
        return x, context  # a pass-through output, as diffusers' joint blocks have


class Stack(nn.Module):
    def __init__(self, d: int = 16, n: int = 5):
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(n))
        self.head = nn.Linear(d, 8)
        self.gradient_checkpointing = False

    def forward(self, x, context=None):
        x = self.embed(x)
        for b in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x, context = checkpoint(b, x, context, use_reentrant=False)
            else:
                x, context = b(x, context=context)
        return self.head(x)


def make_stack(seed: int = 0, n: int = 5, lora: bool = True):
    torch.manual_seed(seed)
    model = Stack(n=n)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.requires_grad_(False)
    adapters = []
    if lora:
        for i, b in enumerate(model.blocks):
            for name in ("qkv", "fc2"):
                a = LoRAModule(f"b{i}_{name}", getattr(b, name), rank=4, alpha=4)
                nn.init.normal_(a.lora_up.weight, std=0.1)
                a.apply_to()
                adapters.append(a)
    return model, nn.ModuleList(adapters)


def step(model, adapters, x, ctx=None):
    for p in adapters.parameters():
        p.grad = None
    out = model(x, ctx)
    (out.square().mean() + out.sum() * 0.01).backward()
    return out.detach().clone(), [p.grad.clone() for p in adapters.parameters()]


def assert_same(a, b):
    out_a, grads_a = a
    out_b, grads_b = b
    torch.testing.assert_close(out_b, out_a, rtol=1e-5, atol=1e-6)
    assert len(grads_a) == len(grads_b)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(gb, ga, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gc", [False, True])
@pytest.mark.parametrize("n", [0, 1, 3, 5])
def test_stack_same_outputs_and_grads(gc, n):
    model, adapters = make_stack()
    model.gradient_checkpointing = gc
    x = torch.randn(2, 6, 8)
    ctx = torch.randn(2, 3, 16)
    ref = step(model, adapters, x, ctx)
    swapper = BlockSwapper(model.blocks, n, CPU).attach()
    assert len(swapper.swapped) == n
    for _ in range(3):  # steady state: slots are reused across steps, blocks stay resident between them
        assert_same(ref, step(model, adapters, x, ctx))
    with torch.no_grad():
        torch.testing.assert_close(model(x, ctx), ref[0], rtol=1e-5, atol=1e-6)
    with torch.inference_mode():  # e.g. previews between steps
        torch.testing.assert_close(model(x, ctx), ref[0], rtol=1e-5, atol=1e-6)
    assert_same(ref, step(model, adapters, x, ctx))
    swapper.detach()
    assert_same(ref, step(model, adapters, x, ctx))


def test_prefetch_two_ahead_and_loads():
    model, adapters = make_stack(n=6)
    x = torch.randn(2, 6, 8)
    ref = step(model, adapters, x)
    swapper = BlockSwapper(model.blocks, 5, CPU, prefetch=2).attach()
    assert len(swapper._slots) == 3
    assert_same(ref, step(model, adapters, x))
    loads = swapper.loads
    assert_same(ref, step(model, adapters, x))
    # steady state: every swapped block is copied in at most once for forward and once for backward
    assert swapper.loads - loads <= 2 * 5
    swapper.detach()


@pytest.mark.parametrize("prefetch", [0, 2])
def test_other_pool_sizes(prefetch):
    model, adapters = make_stack(n=6)
    x = torch.randn(2, 6, 8)
    ref = step(model, adapters, x)
    swapper = BlockSwapper(model.blocks, 5, CPU, prefetch=prefetch).attach()
    assert len(swapper._slots) == prefetch + 1
    assert_same(ref, step(model, adapters, x))
    assert_same(ref, _step_scrambled(model, adapters, x, swapper))
    swapper.detach()


def test_non_resident_block_is_detected():
    """The equality tests cannot pass vacuously: an offloaded block really holds no weights."""
    model, _ = make_stack()
    x = torch.randn(2, 6, 8)
    swapper = BlockSwapper(model.blocks, 2, CPU).attach()
    assert model.blocks[-1].qkv.weight.numel() == 0 and model.blocks[-1].gate.numel() == 0
    assert model.blocks[0].qkv.weight.numel() > 0  # not swapped
    swapper.enabled = False  # hooks off: nothing brings the blocks in
    with pytest.raises(RuntimeError):
        model(x)
    swapper.enabled = True
    model(x)
    swapper.detach()


def _scramble(swapper):
    """Send every block back and overwrite the slots: backward must bring the blocks in again."""
    for e in swapper._entries:
        swapper._release(e)
    for buf in swapper._slots:
        buf.fill_(0x7F)
    swapper._free.reverse()  # and blocks come back into other slots than in the forward


@pytest.mark.parametrize("gc", [False, True])
def test_backward_brings_blocks_back(gc):
    model, adapters = make_stack()
    model.gradient_checkpointing = gc
    x = torch.randn(2, 6, 8)
    ref = step(model, adapters, x)
    swapper = BlockSwapper(model.blocks, 5, CPU).attach()
    for p in adapters.parameters():
        p.grad = None
    out = model(x)
    _scramble(swapper)
    loads = swapper.loads
    (out.square().mean() + out.sum() * 0.01).backward()
    assert swapper.loads - loads >= 5
    assert_same(ref, (out.detach(), [p.grad for p in adapters.parameters()]))
    swapper.detach()


def test_saved_weights_need_the_references():
    """Without gradient checkpointing autograd saves views of the weights (W.t()) that live in slots later
    blocks overwrite.  With the saved-tensor references switched off, gradients come out wrong once the slots
    hold something else (with references, test_backward_brings_blocks_back shows they are right)."""
    model, adapters = make_stack()
    x = torch.randn(2, 6, 8)
    ref = step(model, adapters, x)
    swapper = BlockSwapper(model.blocks, 5, CPU).attach()
    swapper._hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)
    for p in adapters.parameters():
        p.grad = None
    out = model(x)
    torch.testing.assert_close(out, ref[0])  # forward is right...
    _scramble(swapper)
    (out.square().mean() + out.sum() * 0.01).backward()
    grads = [p.grad for p in adapters.parameters()]
    assert any(not torch.allclose(a, b, rtol=1e-3, atol=1e-5) for a, b in zip(ref[1], grads))  # ...backward not
    swapper.detach()


def test_detach_restores_model_exactly():
    model, adapters = make_stack()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = {k: id(v) for k, v in model.named_parameters()}
    x = torch.randn(2, 6, 8)
    expected = sum(t.numel() * t.element_size() for b in model.blocks[2:] for t in [*b.parameters(), *b.buffers()])
    swapper = BlockSwapper(model.blocks, 3, CPU).attach()
    assert swapper.bytes_swapped == expected
    host = swapper.host_state_dict(model)
    assert host.keys() == before.keys() and all(torch.equal(host[k], v) for k, v in before.items())
    step(model, adapters, x)
    assert swapper.resident_bytes == 2 * max(e.nbytes for e in swapper._entries)
    swapper.detach()
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert params == {k: id(v) for k, v in model.named_parameters()}  # the same Parameter objects
    assert all(p.requires_grad is False for p in model.parameters())


def test_trainable_block_parameters_stay():
    model, _ = make_stack(lora=False)
    model.blocks[-1].norm2.weight.requires_grad_(True)  # e.g. a fine-tuned norm inside a swapped block
    w = model.blocks[-1].norm2.weight
    x = torch.randn(2, 6, 8)
    model(x).sum().backward()
    g = w.grad.clone()
    w.grad = None
    swapper = BlockSwapper(model.blocks, 2, CPU).attach()
    assert model.blocks[-1].norm2.weight is w and w.numel() > 0
    model(x).sum().backward()
    torch.testing.assert_close(w.grad, g)
    swapper.detach()


def _full_finetune_steps(n_swap: int, gc: bool, steps: int = 3, prefetch: int = 1):
    """Full fine-tuning of the stack with Adafactor stepping inside backward (as the trainer's fused backward
    pass), the last ``n_swap`` blocks' trained weights streamed through the swapper."""
    from core.optim import build_fused_backward_optimizer
    model, _ = make_stack(lora=False)
    model.requires_grad_(True)
    model.gradient_checkpointing = gc
    swapper = BlockSwapper(model.blocks, n_swap, CPU, trainable=True, prefetch=prefetch).attach() if n_swap else None
    opt = build_fused_backward_optimizer("Adafactor", [{"params": list(model.parameters()), "lr": 1e-2}], 1e-2,
                                         0.0, CPU, warmup_steps=0, relative_step=False, kwargs={})
    if swapper is not None:
        opt.after_step = swapper.param_updated
    torch.manual_seed(1)
    xs = [torch.randn(2, 6, 8) for _ in range(steps)]
    outs = []
    for x in xs:
        out = model(x)
        (out.square().mean() + out.sum() * 0.01).backward()
        outs.append(out.detach().clone())
    names = [n for n, _ in model.named_parameters()]
    values = swapper.live(model.parameters()) if swapper is not None else list(model.parameters())
    weights = {n: v.detach().clone() for n, v in zip(names, values)}
    host = swapper.host_state_dict(model) if swapper is not None else None
    loads = swapper.loads if swapper is not None else 0
    if swapper is not None:
        swapper.detach()
        assert all(torch.equal(p.detach(), weights[n]) for n, p in model.named_parameters())
    return outs, weights, host, loads


@pytest.mark.parametrize("gc", [False, True])
@pytest.mark.parametrize("n,prefetch", [(2, 1), (5, 1), (3, 2)])
def test_full_finetune_of_swapped_blocks(gc, n, prefetch):
    """Trained weights in swapped blocks (``trainable=True``): the optimizer steps each weight inside backward
    while its block is in a slot, the slot goes back to the host master before reuse, and the next step reads
    the updated weights.  Outputs of every step and the final weights equal training without swapping; the
    host copies are the trained values (a missing write-back leaves them at their start values)."""
    plain_outs, plain, _, _ = _full_finetune_steps(0, gc)
    outs, swapped, host, loads = _full_finetune_steps(n, gc, prefetch=prefetch)
    assert loads > n
    for a, b in zip(plain_outs, outs):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    start, _ = make_stack(lora=False)
    start = dict(start.named_parameters())
    for name, value in plain.items():
        torch.testing.assert_close(swapped[name], value, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(host[name], value, rtol=1e-5, atol=1e-6, msg=name)
        assert not torch.equal(value, start[name].detach()), f"{name} did not train"


def test_estimate_matches():
    model, _ = make_stack()
    est = BlockSwapper.estimate(model.blocks, 3)
    swapper = BlockSwapper(model.blocks, 3, CPU).attach()
    assert est["resident_bytes"] == swapper.resident_bytes
    assert est["bytes_swapped"] >= swapper.bytes_swapped
    swapper.detach()


# -- quantized (optimum-quanto qint8) blocks -----------------------------------------------------------

@pytest.mark.parametrize("gc", [False, True])
def test_quanto_qint8_blocks(gc):
    from optimum.quanto import freeze, qint8, quantize
    model, _ = make_stack(lora=False)
    quantize(model.blocks, weights=qint8)
    freeze(model.blocks)
    model.requires_grad_(False)
    model.gradient_checkpointing = gc
    assert type(model.blocks[-1].qkv.weight).__name__ == "WeightQBytesTensor"
    x = torch.randn(2, 6, 8)
    xg = x.clone().requires_grad_(True)
    ref_out = model(xg)
    ref_out.square().sum().backward()
    ref_grad = xg.grad.clone()
    before = {k: v.clone() for k, v in model.state_dict().items() if type(v) is torch.Tensor}
    swapper = BlockSwapper(model.blocks, 3, CPU).attach()
    inner = model.blocks[-1].qkv.weight._data
    assert inner.numel() == 0  # the quantized bytes really left
    for i in range(3):
        xg.grad = None
        out = model(xg)
        if i == 2:
            _scramble(swapper)
        out.square().sum().backward()
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(xg.grad, ref_grad, rtol=1e-5, atol=1e-6)
    swapper.detach()
    torch.testing.assert_close(model(x), ref_out.detach(), rtol=1e-5, atol=1e-6)
    for k, v in before.items():
        assert torch.equal(model.state_dict()[k], v), k


# -- a tiny real diffusers model ---------------------------------------------------------------------------

def _tiny_flux():
    from diffusers import FluxTransformer2DModel

    from tests.tiny_models_dit import FLUX_TRANSFORMER, _perturb
    torch.manual_seed(401)
    model = FluxTransformer2DModel(**FLUX_TRANSFORMER, guidance_embeds=False)
    _perturb(model, torch.Generator().manual_seed(402))
    model.requires_grad_(False)
    adapters = []
    for list_name in ("transformer_blocks", "single_transformer_blocks"):
        for i, b in enumerate(getattr(model, list_name)):
            for path in ("attn.to_q", "attn.to_v", "proj_out" if list_name != "transformer_blocks" else "ff.net.2"):
                layer = b.get_submodule(path)
                a = LoRAModule(f"{list_name}_{i}_{path}", layer, rank=2, alpha=2)
                nn.init.normal_(a.lora_up.weight, std=0.05)
                a.apply_to()
                adapters.append(a)
    g = torch.Generator().manual_seed(7)
    inputs = dict(hidden_states=torch.randn(1, 16, 64, generator=g),
                  encoder_hidden_states=torch.randn(1, 6, 96, generator=g),
                  pooled_projections=torch.randn(1, 32, generator=g),
                  timestep=torch.tensor([0.6]),
                  img_ids=torch.randn(16, 3, generator=g), txt_ids=torch.zeros(6, 3))
    return model, nn.ModuleList(adapters), inputs


def _flux_step(model, adapters, inputs, scramble=None):
    for p in adapters.parameters():
        p.grad = None
    out = model(**inputs).sample
    if scramble is not None:
        _scramble(scramble)
    out.square().mean().backward()
    return out.detach().clone(), [p.grad.clone() for p in adapters.parameters()]


@pytest.fixture(scope="module")
def flux():
    return _tiny_flux()


@pytest.mark.parametrize("gc", [False, True])
def test_flux_transformer_same_outputs_and_grads(flux, gc):
    model, adapters, inputs = flux
    if gc:
        model.enable_gradient_checkpointing()
    else:
        model.disable_gradient_checkpointing()
    model.train()
    ref = _flux_step(model, adapters, inputs)
    assert all(g.abs().sum() > 0 for g in ref[1])
    names = ("transformer_blocks", "single_transformer_blocks")
    n_blocks = len(collect_blocks(model, names))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for n in (0, 1, 3, n_blocks):
        swapper = swap_blocks_of(model, names, n, CPU)
        refs = _count_refs(swapper)
        for _ in range(2):
            assert_same(ref, _flux_step(model, adapters, inputs))
        assert_same(ref, _flux_step(model, adapters, inputs, scramble=swapper))
        assert (refs[0] > 0) == (n > 0 and not gc)  # with checkpointing the recompute needs none
        swapper.detach()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    model.disable_gradient_checkpointing()


@pytest.mark.parametrize("gc", [False, True])
def test_flux2_transformer_same_outputs_and_grads(gc):
    """FLUX.2: the modulation is computed once outside the blocks and passed to every block."""
    from diffusers import Flux2Transformer2DModel
    torch.manual_seed(501)
    model = Flux2Transformer2DModel(patch_size=1, in_channels=32, num_layers=2, num_single_layers=2,
                                    attention_head_dim=16, num_attention_heads=2, joint_attention_dim=96,
                                    timestep_guidance_channels=32, mlp_ratio=3.0, axes_dims_rope=(4, 4, 4, 4),
                                    guidance_embeds=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.requires_grad_(False)
    adapters = []
    for name, m in model.named_modules():
        if name.endswith(("attn.to_q", "ff.linear_out", "attn.to_qkv_mlp_proj", "attn.to_out")) and isinstance(
                m, nn.Linear):
            a = LoRAModule(name, m, rank=2, alpha=2)
            nn.init.normal_(a.lora_up.weight, std=0.05)
            a.apply_to()
            adapters.append(a)
    adapters = nn.ModuleList(adapters)
    g = torch.Generator().manual_seed(9)
    inputs = {"hidden_states": torch.randn(1, 16, 32, generator=g),
              "encoder_hidden_states": torch.randn(1, 6, 96, generator=g), "timestep": torch.tensor([0.6]),
              "img_ids": torch.randn(16, 4, generator=g), "txt_ids": torch.zeros(6, 4)}
    ref = _flux_step(model, adapters, inputs)
    if gc:
        model.enable_gradient_checkpointing()
    names = ("transformer_blocks", "single_transformer_blocks")
    for n in (0, 2, 4):
        swapper = swap_blocks_of(model, names, n, CPU)
        assert_same(ref, _flux_step(model, adapters, inputs))
        assert_same(ref, _flux_step(model, adapters, inputs, scramble=swapper))
        swapper.detach()


def test_sd3_transformer_same_outputs_and_grads():
    """SD3's last joint block has context_pre_only (its context output is None)."""
    from diffusers import SD3Transformer2DModel

    from tests.tiny_models_dit import SD3_TRANSFORMER, _perturb
    torch.manual_seed(301)
    model = SD3Transformer2DModel(**SD3_TRANSFORMER)
    _perturb(model, torch.Generator().manual_seed(302))
    model.requires_grad_(False)
    adapters = []
    for i, b in enumerate(model.transformer_blocks):
        a = LoRAModule(f"b{i}", b.attn.to_k, rank=2, alpha=2)
        nn.init.normal_(a.lora_up.weight, std=0.05)
        a.apply_to()
        adapters.append(a)
    adapters = nn.ModuleList(adapters)
    g = torch.Generator().manual_seed(3)
    inputs = dict(hidden_states=torch.randn(1, 16, 8, 8, generator=g),
                  encoder_hidden_states=torch.randn(1, 5, 96, generator=g),
                  pooled_projections=torch.randn(1, 80, generator=g), timestep=torch.tensor([500.0]))
    ref = _flux_step(model, adapters, inputs)
    for gc in (False, True):
        if gc:
            model.enable_gradient_checkpointing()
        swapper = swap_blocks_of(model, ("transformer_blocks",), 2, CPU)
        assert_same(ref, _flux_step(model, adapters, inputs))
        assert_same(ref, _flux_step(model, adapters, inputs, scramble=swapper))
        swapper.detach()


@pytest.mark.parametrize("gc", [False, True])
def test_sd15_unet_same_outputs_and_grads(gc):
    """A UNet: heterogeneous blocks, tuple outputs with skip connections consumed much later."""
    from diffusers import UNet2DConditionModel

    from tests.tiny_models import SD15_UNET, _perturb
    torch.manual_seed(15)
    model = UNet2DConditionModel(**SD15_UNET)
    _perturb(model, torch.Generator().manual_seed(16))
    model.requires_grad_(False)
    adapters = []
    for name, m in model.named_modules():
        if name.endswith(("attn1.to_q", "attn2.to_v", "ff.net.2")):
            a = LoRAModule(name, m, rank=2, alpha=2)
            nn.init.normal_(a.lora_up.weight, std=0.05)
            a.apply_to()
            adapters.append(a)
    adapters = nn.ModuleList(adapters)
    g = torch.Generator().manual_seed(5)
    inputs = dict(sample=torch.randn(1, 4, 16, 16, generator=g), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, 7, 32, generator=g))
    ref = _flux_step(model, adapters, inputs)
    if gc:
        model.enable_gradient_checkpointing()
    names = ("down_blocks", "mid_block", "up_blocks")
    for n in (2, len(collect_blocks(model, names))):
        swapper = swap_blocks_of(model, names, n, CPU)
        assert_same(ref, _flux_step(model, adapters, inputs))
        assert_same(ref, _flux_step(model, adapters, inputs, scramble=swapper))
        swapper.detach()


# -- streaming (inference) and activation offload ------------------------------------------------------

def test_stream_layers_same_outputs():
    model, _ = make_stack(lora=False)
    x = torch.randn(2, 6, 8)
    with torch.no_grad():
        ref = model(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with stream_layers(model.blocks, CPU) as swapper, torch.no_grad():
        assert all(b.qkv.weight.numel() == 0 for b in model.blocks)
        out = model(x)
        assert all(b.qkv.weight.numel() == 0 for b in model.blocks)  # each went back after its forward
        assert swapper.loads == len(model.blocks)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) and v.device.type == "cpu"


def _step_scrambled(model, adapters, x, swapper):
    """A step whose slots are overwritten between forward and backward."""
    for p in adapters.parameters():
        p.grad = None
    out = model(x)
    _scramble(swapper)
    (out.square().mean() + out.sum() * 0.01).backward()
    return out.detach(), [p.grad.clone() for p in adapters.parameters()]


def _count_refs(swapper):
    count = [0]
    original = swapper._ref_for

    def counting(t):
        ref = original(t)
        count[0] += ref is not None
        return ref
    swapper._ref_for = counting
    return count


@pytest.mark.parametrize("gc", [False, True])
@pytest.mark.parametrize("with_swap", [False, True])
def test_offload_activations_same_grads(with_swap, gc):
    model, adapters = make_stack()
    model.gradient_checkpointing = gc
    x = torch.randn(2, 6, 8)
    ref = step(model, adapters, x)
    swapper = BlockSwapper(model.blocks, 3, CPU).attach() if with_swap else None
    refs = _count_refs(swapper) if swapper else [0]
    ctx = offload_activations(min_bytes=0, simulate=True)
    with ctx:
        got = _step_scrambled(model, adapters, x, swapper) if swapper else step(model, adapters, x)
    # with checkpointing: the 5 blocks' inputs (x and the None context are the checkpoint's inputs) and
    # what embed / head save
    assert ctx.offloaded >= (5 if gc else 20)
    assert (refs[0] > 0) == (with_swap and not gc)  # weights of swapped blocks: references, never copies
    assert_same(ref, got)
    if swapper:
        swapper.detach()


def test_foreign_saved_tensor_hooks_are_chained():
    """Someone else's saved-tensor hooks (save_on_cpu) around the step: weights still become references."""
    model, adapters = make_stack()
    x = torch.randn(2, 6, 8)
    ref = step(model, adapters, x)
    swapper = BlockSwapper(model.blocks, 4, CPU).attach()
    refs = _count_refs(swapper)
    with torch.autograd.graph.save_on_cpu():
        got = _step_scrambled(model, adapters, x, swapper)
    assert refs[0] > 0
    assert_same(ref, got)
    swapper.detach()


@pytest.mark.parametrize("gc", [False, True])
def test_regional_compile_with_swapping(gc):
    """Hooks attached before compile; the hooks themselves run eagerly (torch.compiler.disable) and the
    compiled blocks' saved weights still go through the references (the slots are overwritten here)."""
    model, adapters = make_stack(n=2)
    model.gradient_checkpointing = gc
    x = torch.randn(2, 6, 8)
    ref = step(model, adapters, x)
    swapper = BlockSwapper(model.blocks, 1, CPU).attach()
    model.blocks[1].compile(backend="aot_eager")  # the swapped one (each block compiles its own code)
    try:
        assert_same(ref, step(model, adapters, x))
        assert_same(ref, _step_scrambled(model, adapters, x, swapper))
    finally:
        swapper.detach()
        torch._dynamo.reset()
