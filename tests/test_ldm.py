"""python -m train.ldm, in-process, on latents written by `vae-codec compress` with the
"test" preset codec (mean+std shards, so every epoch draws fresh posterior samples)."""

import pytest
import torch
from conftest import REPO, assert_user_error
from diffusers import DDPMPipeline, UNet2DModel
from PIL import Image
from safetensors.torch import load_file

from codec import Codec
from codec.cli import main as cli
from codec.models import build_autoencoder
from train.ldm import LatentStream, main, sample_latents


@pytest.fixture(scope="module")
def latents(tmp_path_factory, image_folder_module):
    torch.manual_seed(0)
    codec = Codec(build_autoencoder("test"), device="cpu")
    codec.set_factors(0.8)
    codec_dir = codec.save_pretrained(tmp_path_factory.mktemp("codec") / "codec")
    out = tmp_path_factory.mktemp("latents") / "bsds"
    assert cli(["compress", "--codec", str(codec_dir), "--input", str(image_folder_module),
                "--output", str(out), "--resolution", "32", "--store", "mean_std",
                "--num-workers", "0", "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def image_folder_module(tmp_path_factory):
    from conftest import smooth_image

    folder = tmp_path_factory.mktemp("images")
    for i in range(8):
        Image.fromarray(smooth_image(i, 40, 48)).save(folder / f"{i}.png")
    return folder


def args(out, latents, *extra):
    sets = ["model.block_out_channels=[16,32]", "model.norm_num_groups=8", "model.attention_levels=1",
            f"output_dir={out}", f"data.latents={latents}", "batch_size=4", "sample_steps=3",
            "num_samples=4", "sample_every=2", "checkpoint_every=2", "log_every=1", *extra]
    return [str(REPO / "configs" / "ldm-tiny.yaml"), *[x for s in sets for x in ("--set", s)]]


def unet_weights(run):
    return load_file(run / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def run(latents, tmp_path_factory):
    out = tmp_path_factory.mktemp("ldm") / "run"
    assert main(args(out, latents, "max_steps=4")) == 0
    return out


def test_trains_samples_and_exports_a_pipeline(run):
    grid = Image.open(run / "samples" / "step_00000004.png")
    assert grid.size == (2 + 2 * (32 + 2), 2 + 2 * (32 + 2))  # 4 decoded 32x32 samples, 2x2
    assert (run / "samples" / "step_00000002.png").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    assert (run / "tensorboard").is_dir()
    # The export is a diffusers pipeline folder; our sampler draws latents of the data's shape.
    pipe = DDPMPipeline.from_pretrained(run / "pipeline")
    assert isinstance(pipe.unet, UNet2DModel) and not pipe.scheduler.config.clip_sample
    x = sample_latents(pipe.unet, pipe.scheduler, 2, 3, torch.Generator().manual_seed(0))
    assert x.shape == (2, 4, 4, 4) and torch.isfinite(x).all()


def test_flow_matching_objective(latents, tmp_path):
    out = tmp_path / "flow"
    assert main(args(out, latents, "max_steps=2", "objective=flow", "sample_every=0",
                     "checkpoint_every=2")) == 0
    pipe = DDPMPipeline.from_pretrained(out / "pipeline")
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert (out / "samples" / "step_00000002.png").exists()
    # The sampler follows the model's velocity to the data: with the exact velocity for data
    # that is one constant latent c (paths are straight lines), Euler steps land on c.
    c = 0.7

    class Oracle(torch.nn.Module):
        config = pipe.unet.config

        def parameters(self):
            return pipe.unet.parameters()

        def forward(self, x, t):
            sigma = t / 1000
            return type("Out", (), {"sample": (x - (1 - sigma) * c) / sigma - c})()

    x = sample_latents(Oracle(), pipe.scheduler, 2, 7, torch.Generator().manual_seed(0))
    assert torch.allclose(x, torch.full_like(x, c), atol=1e-4)


@pytest.mark.slow
def test_resume_continues_exactly(run, latents, tmp_path):
    resumed = tmp_path / "resumed"
    assert main(args(resumed, latents, "max_steps=2")) == 0
    assert main(args(resumed, latents, "max_steps=4", "resume=true")) == 0
    a, b = unet_weights(run), unet_weights(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), k  # same data, samples, noise and optimiser state


def test_fresh_samples_per_epoch_from_stored_mean_std(latents):
    stream = LatentStream(latents, seed=0, fresh_samples=True)
    assert stream.has_std and stream.shape == (4, 4, 4)
    item = stream.data[3]
    a, b = stream[(3, 0)], stream[(3, 1)]
    assert torch.equal(a, stream[(3, 0)]) and not torch.equal(a, b)  # reproducible, new per epoch
    # Each is mean + std * noise: standardised, it looks like N(0, 1).
    z = torch.stack([(stream[(3, e)] - item["mean"]) / item["std"] for e in range(200)])
    assert abs(z.mean()) < 0.05 and abs(z.std() - 1) < 0.05
    assert torch.equal(LatentStream(latents, 0, fresh_samples=False)[(3, 0)], item["mean"])


def test_bad_settings_are_refused(run, latents, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(args(tmp_path / "x", latents, "prediction_type=x0"))
    assert "prediction_type: unknown 'x0'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(args(tmp_path / "x", latents, "model.unknown=1"))
    assert "model.unknown" in capsys.readouterr().err
    assert_user_error(capsys, main(args(run, latents, "max_steps=6")), "resume=true")
    code = main(args(run, latents, "max_steps=6", "resume=true", "model.block_out_channels=[16,16]"))
    assert_user_error(capsys, code, "model configuration changed.*block_out_channels")
    other = Codec(build_autoencoder("test"), device="cpu").save_pretrained(tmp_path / "other")
    code = main(args(tmp_path / "y", latents, "max_steps=1", f"data.codec={other}"))
    assert_user_error(capsys, code, "not in the latent space of.*made them with data.codec")


def test_flipped_latents_are_one_view_per_epoch_reproducibly(image_folder_module, tmp_path):
    torch.manual_seed(0)
    codec_dir = Codec(build_autoencoder("test"), device="cpu").save_pretrained(tmp_path / "codec")
    out = tmp_path / "flip"
    assert cli(["compress", "--codec", str(codec_dir), "--input", str(image_folder_module), "--output", str(out),
                "--resolution", "32", "--flip", "--num-workers", "0", "--no-progress"]) == 0
    stream = LatentStream(out, seed=0, fresh_samples=False)
    plain, mirrored = stream.data.get(2, False)["latents"], stream.data.get(2, True)["latents"]
    seen = [stream[(2, e)] for e in range(30)]
    assert all(torch.equal(s, plain) or torch.equal(s, mirrored) for s in seen)
    assert 5 < sum(torch.equal(s, mirrored) for s in seen) < 25  # both views over the epochs
    assert all(torch.equal(stream[(2, e)], seen[e]) for e in range(30))  # the same on a resumed run


@pytest.fixture(scope="module")
def labelled_latents(tmp_path_factory):
    """Two classes of real photos (BSDS500; generated images where ../shared is absent)."""
    from conftest import SHARED_DATA, smooth_image

    root = tmp_path_factory.mktemp("classes") / "pets"
    files = sorted((SHARED_DATA / "bsds500" / "train").glob("*.jpg"))[:8]
    for i in range(8):
        (root / ("cats" if i < 4 else "dogs")).mkdir(parents=True, exist_ok=True)
        img = Image.open(files[i]).convert("RGB") if files else Image.fromarray(smooth_image(i, 40, 48))
        img.save(root / ("cats" if i < 4 else "dogs") / f"{i}.png")
    torch.manual_seed(0)
    codec_dir = Codec(build_autoencoder("test"), device="cpu").save_pretrained(tmp_path_factory.mktemp("c") / "codec")
    out = tmp_path_factory.mktemp("latents") / "pets"
    assert cli(["compress", "--codec", str(codec_dir), "--input", str(root), "--output", str(out),
                "--resolution", "32", "--labels", "folders", "--num-workers", "0", "--no-progress"]) == 0
    return out


def test_class_conditional_training_guidance_and_per_class_samples(labelled_latents, tmp_path):
    import json

    out = tmp_path / "cond"
    assert main(args(out, labelled_latents, "max_steps=2", "num_samples=4", "guidance_scale=2.0")) == 0
    unet = UNet2DModel.from_pretrained(out / "pipeline" / "unet")
    assert unet.config.num_class_embeds == 3  # cats, dogs and the null class
    info = json.loads((out / "pipeline" / "vae_codec_ldm.json").read_text())
    assert info["classes"] == ["cats", "dogs"] and info["num_classes"] == 2
    grid = Image.open(out / "samples" / "step_00000002.png")
    assert grid.size == (2 + 2 * (32 + 2), 2 + 2 * (32 + 2))  # a row per class, 2 samples each
    scheduler = DDPMPipeline.from_pretrained(out / "pipeline").scheduler
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    cats, dogs = (sample_latents(unet, scheduler, 2, 3, gen(), torch.full((2,), c), guidance=2.0) for c in (0, 1))
    assert not torch.equal(cats, dogs)  # the label reaches the model
    unguided = sample_latents(unet, scheduler, 2, 3, gen(), torch.zeros(2, dtype=torch.long), guidance=1.0)
    assert not torch.equal(cats, unguided)
    # The README's plain call on a class-conditional model: unconditional samples (the null class).
    plain = sample_latents(unet, scheduler, 2, 3, gen())
    null = sample_latents(unet, scheduler, 2, 3, gen(), torch.full((2,), 2), guidance=1.0)
    assert plain.shape == cats.shape and torch.equal(plain, null)
    # Unconditional training of the same latents when asked, and a clear error without labels.
    assert main(args(tmp_path / "uncond", labelled_latents, "max_steps=1", "class_conditional=no")) == 0
    assert UNet2DModel.from_pretrained(tmp_path / "uncond" / "pipeline" / "unet").config.num_class_embeds is None


def test_guidance_without_a_trained_null_class_is_refused(labelled_latents, tmp_path, capsys):
    code = main(args(tmp_path / "x", labelled_latents, "max_steps=1", "class_dropout=0"))
    assert_user_error(capsys, code, "class_dropout 0 never trains the null class")
    assert main(args(tmp_path / "y", labelled_latents, "max_steps=1", "class_dropout=0", "guidance_scale=1")) == 0


def test_class_conditional_yes_needs_labels(latents, tmp_path, capsys):
    code = main(args(tmp_path / "x", latents, "max_steps=1", "class_conditional=yes"))
    assert_user_error(capsys, code, "holds no labels")


def test_bucketed_latents_train_one_shape_per_batch_and_resume_exactly(tmp_path, capsys):
    from conftest import SHARED_DATA, smooth_image

    src = tmp_path / "mixed"
    src.mkdir()
    files = sorted((SHARED_DATA / "bsds500" / "train").glob("*.jpg"))[:12]
    for i in range(12):
        img = Image.open(files[i]).convert("RGB") if files else Image.fromarray(smooth_image(i, 48, 72))
        (img if i % 2 else img.transpose(Image.Transpose.ROTATE_90)).save(src / f"{i}.png")
    torch.manual_seed(0)
    codec_dir = Codec(build_autoencoder("test"), device="cpu").save_pretrained(tmp_path / "codec")
    lat = tmp_path / "lat"
    assert cli(["compress", "--codec", str(codec_dir), "--input", str(src), "--output", str(lat), "--buckets", "96",
                "--bucket-step", "32", "--num-workers", "0", "--no-progress"]) == 0
    assert len(LatentStream(lat, 0, False).shapes) == 2  # wide and tall buckets
    extra = ("batch_size=2", "max_steps=6", "model.block_out_channels=[16,32]")
    assert main(args(tmp_path / "whole", lat, *extra[:2], *extra[2:])) == 0
    assert main(args(tmp_path / "cut", lat, "batch_size=2", "max_steps=3", extra[2])) == 0
    assert main(args(tmp_path / "cut", lat, *extra, "resume=true")) == 0
    a, b = unet_weights(tmp_path / "whole"), unet_weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
    bad = ("batch_size=2", "max_steps=1", "model.block_out_channels=[16,32,32,32,32]", "model.attention_levels=1")
    code = main(args(tmp_path / "deep", lat, *bad))  # 64x128 px buckets: latents of 8 and 16
    assert_user_error(capsys, code, "not multiples of 16")


def test_a_nan_batch_is_skipped_and_counted_too_many_stop_the_run(latents, tmp_path, monkeypatch, capsys):
    import json

    import train.diffusion.loop as ldm_loop

    real, calls = ldm_loop.diffusion_loss, []

    def nan_at_step_2(*a, **k):
        calls.append(1)
        loss = real(*a, **k)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(ldm_loop, "diffusion_loss", nan_at_step_2)
    out = tmp_path / "nan"
    assert main(args(out, latents, "max_steps=4", "checkpoint_every=4")) == 0  # was: FloatingPointError
    assert "step 1: non-finite loss, step skipped (1 in a row, 1 in this run)" in capsys.readouterr().out
    state = json.loads((out / "checkpoints" / "step_00000004" / "train_state.json").read_text())
    assert state["nonfinite"] == {"total": 1, "in_a_row": 0}
    monkeypatch.setattr(ldm_loop, "diffusion_loss", lambda *a, **k: real(*a, **k) * float("nan"))
    assert main(args(tmp_path / "all_nan", latents, "max_steps=4", "max_nonfinite_steps=2")) == 1
    assert "2 optimiser steps in a row had a non-finite loss" in capsys.readouterr().err


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_that_resumes_bit_exactly(latents, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "train.ldm", *args(out, latents, "max_steps=100000", "checkpoint_every=3",
                                                    "sample_every=0", "keep_checkpoints=10")]
    # The threads this process computes with: results differ in the last bit with another count.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=env)
    deadline = time.monotonic() + 240
    while not (out / "checkpoints" / "step_00000003" / "COMPLETE").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else "timeout"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGTERM)  # what a scheduler sends before killing a pre-empted job
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted (SIGTERM)" in output and "resume=true" in output, output
    steps = max(int(p.name.split("_")[1]) for p in (out / "checkpoints").iterdir() if (p / "COMPLETE").exists())
    assert steps >= 3
    assert main(args(out, latents, f"max_steps={steps + 2}", "sample_every=0", "resume=true")) == 0
    assert main(args(tmp_path / "straight", latents, f"max_steps={steps + 2}", "sample_every=0")) == 0
    a, b = unet_weights(out), unet_weights(tmp_path / "straight")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ"
