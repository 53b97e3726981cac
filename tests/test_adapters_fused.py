"""An adapter trained over several layers that read one input (q, k, v → the original checkpoint's fused qkv)
behaves exactly like the same adapter on a real fused Linear layer: outputs, gradients, every algorithm."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from core.adapters.fused import FusedLinear
from core.adapters.network import ALGORITHMS

# q, k, v and an MLP input of another width, as FLUX.1's single-block linear1 (64 rows: BOFT needs m·2^k)
IN, SIZES = 16, (8, 8, 8, 40)
CASES = [("lora", {}), ("lora", {"dora": True}), ("loha", {}), ("loha", {"dora": True}), ("lokr", {}),
         ("lokr", {"factor": 4, "decompose_both": True}), ("lokr", {"dora": True, "dora_on_output": True}),
         ("ia3", {}), ("diag-oft", {}), ("boft", {}), ("glora", {}), ("full", {})]


def _parts(seed=0) -> list[nn.Linear]:
    torch.manual_seed(seed)
    return [nn.Linear(IN, n) for n in SIZES]


def _reference(parts: list[nn.Linear]) -> nn.Linear:
    fused = nn.Linear(IN, sum(SIZES))
    with torch.no_grad():
        fused.weight.copy_(torch.cat([p.weight for p in parts]))
        fused.bias.copy_(torch.cat([p.bias for p in parts]))
    return fused


def _build(algo: str, base: nn.Module, options: dict):
    return ALGORITHMS[algo]("lora_unet_single_blocks_0_linear1", base, 4, 2.0, **options)


def _plain(parts, x) -> torch.Tensor:
    """The parts' own outputs, concatenated, whatever is hooked."""
    return torch.cat([nn.Linear.forward(p, x) for p in parts], dim=-1)


def _trained_like(adapter) -> None:
    """Move every parameter off its initial value (a zero-initialised side would hide a wrong slice)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def _run_parts(parts, x, order=None) -> list[torch.Tensor]:
    order = order or range(len(parts))
    outs = {i: parts[i](x) for i in order}
    return [outs[i] for i in range(len(parts))]


@pytest.mark.parametrize("algo,options", CASES, ids=[f"{a}{'-' + '-'.join(o) if o else ''}" for a, o in CASES])
def test_fused_view_equals_a_real_fused_layer(algo, options):
    parts = _parts()
    reference = _reference(parts)
    ours = _build(algo, FusedLinear(parts), options)
    theirs = _build(algo, reference, options)
    _trained_like(ours)
    theirs.load_tensors(ours.training_tensors())
    ours.apply_to()
    theirs.apply_to()
    x = torch.randn(2, 5, IN, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    got = torch.cat(_run_parts(parts, x, order=[3, 0, 1, 2]), dim=-1)   # FLUX calls the MLP input first
    want = reference(x2)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - _plain(parts, x)).abs().max() > 1e-4      # the adapter does change the output
    # the same gradients for every adapter parameter and for the input
    upstream = torch.randn_like(want)
    (got * upstream).sum().backward()
    (want * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-5)
    for (name, p), (_, q) in zip(ours.named_parameters(), theirs.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    ours.restore()
    for p in parts:
        assert "forward" not in p.__dict__
    torch.testing.assert_close(torch.cat(_run_parts(parts, x2), -1), _plain(parts, x2))


def test_contribution_is_computed_once_per_input_and_let_go():
    parts = _parts()
    view = FusedLinear(parts)
    adapter = _build("lokr", view, {})
    _trained_like(adapter)
    calls = []
    compute = adapter.contribution
    adapter.contribution = lambda x: calls.append(x) or compute(x)
    adapter.apply_to()
    x = torch.randn(3, IN)
    _run_parts(parts, x)
    assert len(calls) == 1 and view._shared_delta is None and view._shared_input is None   # nothing kept
    _run_parts(parts, x)                     # the same tensor again (gradient checkpointing's recompute)
    assert len(calls) == 2
    parts[0](torch.randn(3, IN))             # another input: its own contribution
    assert len(calls) == 3
    adapter.restore()
    assert view._shared_delta is None


def test_multiplier_zero_and_module_dropout_leave_the_parts_alone():
    parts = _parts()
    adapter = _build("lora", FusedLinear(parts), {})
    _trained_like(adapter)
    adapter.apply_to()
    x = torch.randn(2, IN)
    adapter.multiplier = 0.0
    torch.testing.assert_close(torch.cat(_run_parts(parts, x), -1), _plain(parts, x))
    adapter.restore()


def test_parts_must_share_their_input_width():
    with pytest.raises(ValueError, match="different widths"):
        FusedLinear([nn.Linear(8, 4), nn.Linear(6, 4)])
    with pytest.raises(RuntimeError, match="call the model"):
        FusedLinear([nn.Linear(8, 4)])(torch.zeros(1, 8))
