"""The training entry point, in-process, on generated images with the smallest preset."""

import json

import pytest
import torch
from conftest import REPO, assert_user_error
from safetensors.torch import load_file

from train.__main__ import main


def args(out, data, *extra):
    return [
        str(REPO / "configs" / "tiny.yaml"),
        "--set", "model.preset=test", "--set", f"output_dir={out}", "--set", f"data.train={data}",
        "--set", "data.crop_size=32", "--set", "batch_size=2", "--set", "data.num_workers=0",
        "--set", "loss.perceptual_net=alex", "--set", "loss.perceptual_weight=0.1",
        "--set", "loss.disc_weight=0.5", "--set", "loss.disc_start=2",
        "--set", "loss.disc_channels=8", "--set", "loss.disc_layers=2",
        "--set", "optim.schedule=constant", "--set", "optim.warmup_steps=2",
        "--set", "checkpoint_every=3", "--set", "image_every=3", "--set", "log_every=1",
        "--set", "scale_samples=4",
        *[x for e in extra for x in ("--set", e)],
    ]


def weights(folder):
    return load_file(folder / "diffusion_pytorch_model.safetensors")


def test_resume_continues_exactly(tmp_path, image_folder):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(args(straight, image_folder, "max_steps=6")) == 0
    assert main(args(resumed, image_folder, "max_steps=3")) == 0
    assert main(args(resumed, image_folder, "max_steps=6", "resume=true")) == 0
    a, b = weights(straight / "codec"), weights(resumed / "codec")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # same data order, RNG and optimiser state
    meta = json.loads((resumed / "codec" / "vae_codec.json").read_text())
    assert meta["step"] == 6 and meta["train_config"]["max_steps"] == 6
    assert meta["latent_stats"]["scaling_factor"] > 0
    ckpts = sorted(p.name for p in (resumed / "checkpoints").iterdir())
    assert ckpts == ["step_00000003", "step_00000006"]  # keep_checkpoints=2
    assert (resumed / "checkpoints" / "step_00000006" / "config.yaml").exists()
    assert list((straight / "tensorboard").rglob("events.out.tfevents*"))
    assert (straight / "samples" / "train_00000003.png").exists()


def test_refuses_to_mix_runs(tmp_path, image_folder, capsys):
    out = tmp_path / "run"
    assert main(args(out, image_folder, "max_steps=3")) == 0
    assert_user_error(capsys, main(args(out, image_folder, "max_steps=6")), "resume=true")
    code = main(args(out, image_folder, "max_steps=6", "resume=true", "model.preset=tiny"))
    assert_user_error(capsys, code, "model configuration changed.*block_out_channels")


def test_bad_files_are_listed_and_training_goes_on(tmp_path, image_folder):
    (image_folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff garbage")
    out = tmp_path / "run"
    assert main(args(out, image_folder, "max_steps=7", "loss.perceptual_weight=0")) == 0
    listing = (out / "skipped_files.tsv").read_text()
    assert "corrupt.jpg" in listing and (out / "codec" / "config.json").exists()


def test_decoder_only_keeps_encoder(tmp_path, image_folder):
    from codec import Codec

    init = tmp_path / "init"
    assert main(args(init, image_folder, "max_steps=2", "loss.perceptual_weight=0", "ema_decay=0")) == 0
    out = tmp_path / "ft"
    assert main(args(out, image_folder, "max_steps=2", f"model.init_from={init / 'codec'}",
                     "model.train_decoder_only=true", "loss.perceptual_weight=0", "ema_decay=0")) == 0
    before, after = weights(init / "codec"), weights(out / "codec")
    enc = [k for k in before if k.startswith("encoder.")]
    dec = [k for k in before if k.startswith("decoder.")]
    assert all(torch.equal(before[k], after[k]) for k in enc)
    assert any(not torch.equal(before[k], after[k]) for k in dec)
    assert Codec.from_pretrained(out / "codec").vae.config.block_out_channels


def test_config_errors_exit_cleanly(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(REPO / "configs" / "tiny.yaml"), "--set", "optim.lrr=1"])
    assert "valid keys" in capsys.readouterr().err


def test_learned_logvar_accumulation_and_bf16_autocast(tmp_path, image_folder):
    out = tmp_path / "run"
    assert main(args(out, image_folder, "max_steps=3", "loss.learn_logvar=true", "grad_accum=2",
                     "mixed_precision=bf16", "optim.max_grad_norm=1.0", "loss.disc_weight=0")) == 0
    folder = out / "checkpoints" / "step_00000003"
    assert load_file(folder / "train_state.safetensors")["logvar.value"].item() != 0.0  # it moved from 0
    assert json.loads((folder / "train_state.json").read_text())["train"]["step"] == 3
    assert not list(folder.glob("custom_checkpoint_*"))  # nothing of ours is pickled


def test_unusable_validation_files_are_reported(tmp_path, image_folder, capsys):
    val = tmp_path / "val"
    val.mkdir()
    (val / "broken.png").write_bytes(b"not an image")
    (image_folder / "img01.jpg").rename(val / "good.jpg")
    out = tmp_path / "run"
    assert main(args(out, image_folder, "max_steps=1", "loss.perceptual_weight=0", f"data.val={val}",
                     "data.val_crop=32", "loss.disc_weight=0")) == 0
    printed = capsys.readouterr().out
    assert "validation skipped:" in printed and "broken.png" in printed


def test_a_short_run_shows_validates_and_says_why_it_stopped(tmp_path, image_folder, capsys):
    out = tmp_path / "run"
    short = ("max_steps=3", "image_every=500", "val_every=500", f"data.val={image_folder}", "data.val_images=2",
             "data.val_crop=32", "loss.perceptual_weight=0", "loss.disc_weight=0")
    assert main(args(out, image_folder, *short)) == 0
    said = capsys.readouterr().out
    assert "validation: " in said and "step 3 (max_steps 3 reached)" in said
    assert sorted(p.name for p in (out / "samples").glob("train_*.png")) == ["train_00000003.png"]  # the last step
    assert sorted(p.name for p in (out / "samples").glob("val_*.png")) == ["val_00000003.png"]  # once, at the end
    assert main(args(out, image_folder, *short, "resume=true")) == 0
    assert "nothing left to do: the run is at max_steps 3" in capsys.readouterr().out
