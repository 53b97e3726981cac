"""Regional compilation on the real training path (Inductor runs on the CPU too, so CI exercises it)."""
import torch

from tests.test_train_options import run, tiny  # noqa: F401  (tiny is a fixture pytest finds by name)


def test_regional_compile_trains_and_matches_eager_loss(tiny, tmp_path):  # noqa: F811
    compiled, events = run(tiny, tmp_path / "c", memory__compile="regional", schedule__max_train_steps=2)
    eager, eager_events = run(tiny, tmp_path / "e", memory__compile="off", schedule__max_train_steps=2)
    assert any("Compiling" in e.get("message", "") for e in events)
    loss_c = [e["loss"] for e in events if e["type"] == "progress"]
    loss_e = [e["loss"] for e in eager_events if e["type"] == "progress"]
    torch.testing.assert_close(torch.tensor(loss_c), torch.tensor(loss_e), rtol=1e-3, atol=1e-4)
