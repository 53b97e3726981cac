"""The tier benchmark's own code path (random weights from a config, the plan for a budget, the trainer's
setup_denoiser, timed LoRA steps) runs end to end on the CPU with a tiny model's config, so it does not rot
between the sessions that have a GPU to run it on."""
from bench.bench_tiers import markdown_table, run_one
from tests.tiny_models import build_tiny_sd15, tiny_config_dir


def test_tier_bench_child_runs_on_the_cpu(tmp_path):
    build_tiny_sd15(tmp_path, "single_file")
    row = run_one("sd15", 0.0, 64, steps=2, warmup=1, cpu=True, config_dir=tiny_config_dir("sd15", tmp_path))
    assert row["fits"], row
    assert row["s_per_it"] > 0 and row["estimate_gb"] >= 0 and row["device"] == "cpu"
    from core.hardware import detect_hardware
    assert row["plan"].startswith(f"{'bf16' if detect_hardware().cpu_bf16 else 'fp32'}, attn default")
    table = markdown_table([row, {"arch": "flux1_dev", "tier_gb": 8.0, "resolution": 1024, "fits": False,
                                  "error": "out of memory", "plan": "bf16"}])
    assert "| sd15 | 64 | CPU | yes |" in table and "| flux1_dev | 1024 | 8 GB | no |" in table


def test_gpu_check_runs_every_part_on_the_cpu(tmp_path):
    """bench/gpu_check.sh --cpu: the pipeline a GPU session runs (tests, the step bench against diffusers + peft,
    the block-swap self-check, the tier table), here on a tiny FLUX.1 config (the UNet step bench has its own
    test below), ending with its summary table; the block-swap check's figures are exact."""
    import re
    import subprocess
    from pathlib import Path

    from tests.tiny_models_dit import build_tiny_dit
    root = Path(__file__).resolve().parent.parent
    build_tiny_dit("flux1_dev", tmp_path / "configs" / "flux1_dev", "diffusers")
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--cpu", "--config-dir", str(tmp_path / "configs"),
                           "--out", str(tmp_path / "logs")], cwd=root, capture_output=True, text=True, timeout=600)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-2000:]
    for name in ("gpu", "tests", "step-flux1_dev", "swap", "tiers"):
        assert re.search(rf"^\| {name} \| ok \| \d+ s \|$", out, re.M), (name, out[-3000:])
        assert (tmp_path / "logs" / f"{name}.log").is_file()
    assert re.search(r"^flux1_dev fp32 speed ratio ours / diffusers\+peft: \d+\.\d+x", out, re.M), out
    assert re.search(r"^\| flux1_dev \| 64 px b1 ckpt \| fp32 \| \d+\.\d+ img/s, peak RSS +\d+\.\d+ GB \| "
                     r"\d+\.\d+ img/s, peak RSS +\d+\.\d+ GB \| \d+\.\d+x \|$", out, re.M), out
    assert out.count("max |out diff| 0, max rel grad diff 0;") == 2, out
    assert "full fine-tune: max rel weight diff 0 after 3 steps" in out, out
    assert "| flux1_dev | 64 | CPU | yes |" in out, out


def test_step_bench_runs_both_sides_on_the_cpu(tmp_path):
    """bench_step.py --cpu: the plain diffusers + peft step and ours, in fp32 and bf16, on a tiny UNet config."""
    import re
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    build_tiny_sd15(tmp_path, "single_file")
    proc = subprocess.run([sys.executable, "bench/bench_step.py", "sd15", "--cpu", "--config-dir",
                           str(tiny_config_dir("sd15", tmp_path)), "--resolution", "64", "--batch", "1", "--steps", "1",
                           "--warmup", "1", "--precision", "fp32", "bf16", "--threads", "1"],
                          cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for precision in ("fp32", "bf16"):
        for side in ("diffusers+peft", "ours"):
            line = re.search(rf"^sd15  64px b1 {precision}  {re.escape(side)} +(\d+\.\d+) s/it "
                             rf"\( *(\d+\.\d+) CPU s/it\)", proc.stdout, re.M)
            assert line and float(line[1]) > 0 and float(line[2]) > 0, proc.stdout
        # both sides train the same layers at the same rank
        params = re.findall(rf"^sd15  64px b1 {precision} .*lora params (\d+\.\d+) M", proc.stdout, re.M)
        assert len(params) == 2 and params[0] == params[1], proc.stdout
        assert re.search(rf"^sd15  {precision} speed ratio ours / diffusers\+peft: \d+\.\d+x "
                         rf"\(CPU time \d+\.\d+x\)$", proc.stdout, re.M)
