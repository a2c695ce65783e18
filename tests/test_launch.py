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


def test_two_processes_record_the_skips_of_every_rank(tmp_path, image_folder):
    """Each rank sees only its own batches; skipped_files.tsv and the checkpoint hold both ranks'."""
    import json

    from codec.sources import list_source
    from train.common.sampler import EpochSampler

    for i in range(6):  # between the good ones in key order: each replaced by a good neighbour
        (image_folder / f"img{2 * i + 1:02d}z.png").write_bytes(b"not a png")
    out, steps, batch = tmp_path / "run", 4, 2
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "train", "--set", "model.preset=test", "--set", f"output_dir={out}",
        "--set", f"data.train={image_folder}",
        "--set", "data.crop_size=32", "--set", f"batch_size={batch}", "--set", f"max_steps={steps}",
        "--set", "checkpoint_every=100", "--set", "data.num_workers=0", "--set", "loss.perceptual_weight=0",
        "--set", "scale_samples=4", "--set", "val_every=0", "--set", "image_every=0",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # What each rank met: its sampler's items, each bad one replaced by the next (train.autoencoder.data.CropDataset).
    inputs = list_source(image_folder)
    bad = {i for i, item in enumerate(inputs) if item.key.endswith("z.png")}
    seen = []
    for rank in range(2):
        met = set()
        for index, _ in EpochSampler(len(inputs), 0, rank, 2, batch):
            while index in bad:
                met.add(inputs[index].where)
                index = (index + 1) % len(inputs)
        seen.append(met)
    assert seen[0] and seen[1] - seen[0]  # rank 1 met bad files rank 0 never did
    listed = dict(line.split("\t", 1) for line in (out / "skipped_files.tsv").read_text().splitlines())
    assert set(listed) == seen[0] | seen[1]
    state = json.loads((out / "checkpoints" / f"step_{steps:08d}" / "train_state.json").read_text())
    assert set(next(e["skipped"] for e in state.values() if "skipped" in e)) == seen[0] | seen[1]
