"""Real subprocesses: `accelerate launch --cpu --num_processes 2 -m train`, and the demo job."""

import subprocess
import sys

import pytest
from conftest import REPO
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


def test_accelerate_launch_two_cpu_processes(tmp_path, image_folder):
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "train", str(REPO / "configs" / "tiny.yaml"),
        "--set", "model.preset=test", "--set", f"output_dir={out}", "--set", f"data.train={image_folder}",
        "--set", "data.crop_size=32", "--set", "batch_size=2", "--set", "max_steps=4",
        "--set", "checkpoint_every=2", "--set", "data.num_workers=0", "--set", "loss.perceptual_weight=0",
        "--set", "loss.disc_weight=0.5", "--set", "loss.disc_start=1", "--set", "loss.disc_channels=8",
        "--set", "scale_samples=4",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    assert (out / "codec" / "diffusion_pytorch_model.safetensors").exists()
    ckpt = out / "checkpoints" / "step_00000004"
    assert (ckpt / "random_states_0.pkl").exists() and (ckpt / "random_states_1.pkl").exists()
    assert load_file(out / "codec" / "diffusion_pytorch_model.safetensors")


def test_demo_runs_end_to_end(tmp_path):
    from scripts.demo import main

    assert main(["--out", str(tmp_path / "demo"), "--steps", "6"]) == 0
    for name in ("reconstructions.png", "metrics.json", "export/config.json"):
        assert (tmp_path / "demo" / name).exists(), name
