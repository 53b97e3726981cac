"""Per-block ranks: the family names the blocks, the adapter layer applies the ranks."""
import pytest
import torch

import architectures
from core.adapters import build_network
from core.adapters.network import AdapterOptions, parse_block_ranks
from core.settings import Settings
from tests.tiny_models import build_tiny_sdxl


def test_parse_block_ranks():
    assert parse_block_ranks("down_0=4, mid=32/16\nte1=0") == {"down_0": (4, None), "mid": (32, 16.0),
                                                                  "te1": (0, None)}
    assert parse_block_ranks("  ") == {}
    for bad in ("down_0", "mid=x", "=4", "up_1=-2"):
        with pytest.raises(ValueError, match="block_ranks"):
            parse_block_ranks(bad)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    arch = architectures.get("sdxl")
    comps = arch.load(build_tiny_sdxl(tmp_path_factory.mktemp("br") / "sdxl", "diffusers"), None, torch.float32)
    return arch, comps


def test_ranks_follow_blocks_and_keep_the_scale(sdxl):
    arch, comps = sdxl
    s = Settings()
    s.model.architecture = "sdxl"
    s.network.rank, s.network.alpha = 8, 4.0
    s.network.train_text_encoder = True
    s.network.block_ranks = "down_1=2, mid=16/16, te2=0"
    targets = arch.select_adapter_targets(comps, s.network.target, True)
    blocks = {t.block for t in targets}
    assert {"down_1", "mid", "up_0", "te1", "te2"} <= blocks
    net = build_network(targets, "lora", 8, 4.0, 0.0, AdapterOptions.from_settings(s.network))
    by_block = {}
    for t in targets:
        if t.name in net.adapters:
            m = net.adapters[t.name]
            by_block.setdefault(t.block, set()).add((m.lora_down.weight.shape[0], m.alpha_value))
    assert by_block["down_1"] == {(2, 1.0)}      # own rank, alpha keeps alpha/rank = 0.5
    assert by_block["mid"] == {(16, 16.0)}       # own rank and alpha
    assert by_block["up_0"] == {(8, 4.0)}        # untouched blocks keep the network's
    assert "te2" not in by_block                 # rank 0 leaves the block out
    assert all(t.name.startswith("lora_te2_") for t in targets if t.name not in net.adapters)


def test_unknown_block_names_list_the_real_ones(sdxl):
    arch, comps = sdxl
    targets = arch.select_adapter_targets(comps, "attn_mlp", False)
    with pytest.raises(ValueError, match=r"down_7.*blocks of this model.*mid"):
        build_network(targets, "lora", 4, 4.0, 0.0, AdapterOptions(block_ranks={"down_7": (2, None)}))


def test_flux_blocks_are_double_and_single():
    arch = architectures.get("flux1_dev")
    from architectures.base import AdapterTarget
    t = [AdapterTarget("a", torch.nn.Linear(2, 2), "unet", "transformer_blocks.3.attn.to_q"),
         AdapterTarget("b", torch.nn.Linear(2, 2), "unet", "single_transformer_blocks.12.proj_out")]
    assert [arch.block_of(x) for x in t] == ["double_3", "single_12"]
