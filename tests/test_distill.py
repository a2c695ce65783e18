"""`python -m train.distill`: AutoencoderTiny students of an AutoencoderKL teacher, in-process,
on generated images with the smallest presets; the exports checked by diffusers and our CLI."""

import json

import pytest
import torch
from conftest import assert_user_error
from diffusers import AutoencoderKL, AutoencoderTiny
from safetensors.torch import load_file

from codec import Codec
from codec.cli import main as cli
from codec.models import build_autoencoder, build_student
from train.distill import main


@pytest.fixture
def teacher(tmp_path):
    """A test-preset AutoencoderKL with a scaling factor, saved as one of our codecs."""
    torch.manual_seed(0)
    codec = Codec(build_autoencoder("test"), device="cpu")
    codec.set_factors(scaling_factor=0.5)
    return codec.save_pretrained(tmp_path / "teacher")


def args(out, data, teacher, *extra):
    return [
        "--set", f"distill.teacher={teacher}", "--set", "distill.student=test", "--set", f"output_dir={out}",
        "--set", f"data.train={data}", "--set", "data.crop_size=32", "--set", "batch_size=2",
        "--set", "data.num_workers=0", "--set", "loss.perceptual_net=alex", "--set", "loss.perceptual_weight=0.1",
        "--set", "loss.disc_channels=8", "--set", "loss.disc_layers=2", "--set", "checkpoint_every=2",
        "--set", "log_every=1", "--set", "optim.lr=1e-3",
        *[x for e in extra for x in ("--set", e)],
    ]


def weights(folder):
    return load_file(folder / "diffusion_pytorch_model.safetensors")


def log(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_student_exports_a_diffusers_autoencoder_tiny_that_decodes_teacher_latents(tmp_path, image_folder, teacher):
    out = tmp_path / "student"
    assert main(args(out, image_folder, teacher, "max_steps=3", "loss.disc_weight=0.5", "loss.disc_start=1")) == 0
    steps = log(out)
    assert [s["step"] for s in steps] == [1, 2, 3]
    assert all({"latent_mse", "rec", "lpips"} <= s.keys() for s in steps) and "d_loss" in steps[-1]
    # The other side: diffusers loads the export as an AutoencoderTiny whose latents need no factors.
    student = AutoencoderTiny.from_pretrained(out / "codec")
    assert student.config.scaling_factor == 1.0 and student.config.shift_factor == 0.0
    meta = json.loads((out / "codec" / "vae_codec.json").read_text())
    assert meta["latent_stats"]["teacher"] == str(teacher)
    assert meta["latent_stats"]["teacher_factors"]["scaling_factor"] == 0.5
    # Latents the teacher made, decoded with the student through the CLI and by hand with diffusers.
    img = sorted(image_folder.glob("*.png"))[0]
    latents = tmp_path / "latents.safetensors"
    assert cli(["encode", "--codec", str(teacher), str(img), str(latents)]) == 0
    assert cli(["decode", "--codec", str(out / "codec"), str(latents), str(tmp_path / "dec.png")]) == 0
    assert (tmp_path / "dec.png").exists()
    # ... and the other way: the student's latents are in the teacher's space, so the teacher decodes them
    assert cli(["encode", "--codec", str(out / "codec"), str(img), str(tmp_path / "s.safetensors")]) == 0
    assert cli(["decode", "--codec", str(teacher), str(tmp_path / "s.safetensors"), str(tmp_path / "t.png")]) == 0
    z = next(iter(load_file(latents).values()))
    z = z[None] if z.ndim == 3 else z
    with torch.no_grad():
        by_hand = student.decode(z.float()).sample
    ours = Codec.from_pretrained(out / "codec", device="cpu").decode(z)
    assert torch.allclose(ours, by_hand, atol=1e-5)


def test_targets_are_the_teachers_codec_latents_and_decoding(teacher):
    from train.autoencoder.config import load_config
    from train.autoencoder.recipes.student import DistillRecipe

    cfg = load_config(overrides=[f"distill.teacher={teacher}", "model.kind=autoencoder-tiny"])
    recipe = DistillRecipe(cfg)
    x = torch.rand(2, 3, 32, 40) * 2 - 1
    latents, decoded = recipe.targets(x)
    codec = Codec.from_pretrained(teacher, device="cpu")  # independent path: the public codec API
    assert torch.allclose(latents, codec.encode(x), atol=1e-6)
    assert torch.allclose(decoded, codec.decode(codec.encode(x)), atol=1e-5)


@pytest.mark.parametrize("part,trained,kept", [("decoder", "decoder.", "encoder."),
                                               ("encoder", "encoder.", "decoder.")])
def test_one_part_trains_the_other_stays(tmp_path, image_folder, teacher, part, trained, kept):
    init = tmp_path / "init"
    torch.manual_seed(1)
    start = build_student("test")
    start.register_to_config(scaling_factor=1.5305, shift_factor=0.0609)  # TAESD3-like factors of raw latents
    start.save_pretrained(init)
    out = tmp_path / part
    assert main(args(out, image_folder, teacher, "max_steps=2", f"distill.train={part}", f"model.init_from={init}",
                     "ema_decay=0")) == 0
    exported = json.loads((out / "codec" / "config.json").read_text())
    assert (exported["scaling_factor"], exported["shift_factor"]) == (1.0, 0.0)  # it learnt the scaled latents
    before, after = weights(init), weights(out / "codec")
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(kept))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(trained))
    logged = log(out)[0]
    assert ("latent_mse" in logged) == (part == "encoder") and ("lpips" in logged) == (part == "decoder")


def test_resume_continues_exactly(tmp_path, image_folder, teacher):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(args(straight, image_folder, teacher, "max_steps=4")) == 0
    assert main(args(resumed, image_folder, teacher, "max_steps=2")) == 0
    assert main(args(resumed, image_folder, teacher, "max_steps=4", "resume=true")) == 0
    a, b = weights(straight / "codec"), weights(resumed / "codec")  # EMA weights (on by default)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_teachers_and_students_are_refused(tmp_path, image_folder, teacher, capsys):
    torch.manual_seed(0)
    build_student("test").save_pretrained(tmp_path / "tiny")
    code = main(args(tmp_path / "a", image_folder, tmp_path / "tiny", "max_steps=1"))
    assert_user_error(capsys, code, "not an AutoencoderKL")
    wide = AutoencoderTiny(encoder_block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4,
                           num_encoder_blocks=(1,) * 4, num_decoder_blocks=(1,) * 4, latent_channels=8)
    wide.save_pretrained(tmp_path / "wide")
    code = main(args(tmp_path / "b", image_folder, teacher, "max_steps=1", f"model.init_from={tmp_path / 'wide'}"))
    assert_user_error(capsys, code, "8 latent channels.*has 4")
    kl = tmp_path / "kl"
    AutoencoderKL(**{**build_autoencoder("test").config}).save_pretrained(kl)
    code = main(args(tmp_path / "c", image_folder, teacher, "max_steps=1", f"model.init_from={kl}"))
    assert_user_error(capsys, code, "not an AutoencoderTiny")


@pytest.mark.parametrize("setting,message", [
    (None, "needs distill.teacher"),
    ("model.gradient_checkpointing=true", "gradient_checkpointing"),
    ("loss.learn_logvar=true", "learn_logvar"),
    ("distill.train=both-ways", "distill.train: unknown"),
])
def test_config_errors_name_the_setting(tmp_path, image_folder, teacher, capsys, setting, message):
    extra = [setting] if setting else []
    argv = args(tmp_path / "x", image_folder, teacher if setting else "", "max_steps=1", *extra)
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_student_gan_gradient_equals_the_double_backward_reference():
    """The one-pass adaptive GAN weight (train.losses.adversarial_loss) on an AutoencoderTiny,
    whose output is 2 · (last conv) − 1, against the reference's autograd.grad to the last layer."""
    from train.autoencoder.discriminator import PatchDiscriminator
    from train.autoencoder.losses import adversarial_loss
    from train.autoencoder.recipes.student import DistillRecipe

    torch.set_num_threads(1)
    torch.manual_seed(0)
    student = build_student("test")
    disc = PatchDiscriminator(channels=8, layers=2).requires_grad_(False)
    z, target = torch.randn(2, 4, 4, 4), torch.rand(2, 3, 32, 32) * 2 - 1
    last = DistillRecipe.last_layer(None, student)

    def gradients(loss_fn):
        student.zero_grad(set_to_none=True)
        out = student.decode(z).sample
        rec, g = (out - target).abs().mean(), -disc(out).mean()
        loss, d_weight = loss_fn(rec, g, out)
        loss.backward()
        return float(d_weight), {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}

    def reference(rec, g, out):
        rec_grad = torch.autograd.grad(rec, last, retain_graph=True)[0]
        g_grad = torch.autograd.grad(g, last, retain_graph=True)[0]
        d_weight = (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0, 1e4).detach() * 0.5
        return rec + d_weight * 0.7 * g, d_weight

    def ours(rec, g, out):
        loss, _, d_weight = adversarial_loss(rec, torch.zeros(()), g, out, last, torch.zeros(()), 0.5, 0.7, None)
        return loss, d_weight

    d_weight, grads = gradients(ours)
    ref_d_weight, ref_grads = gradients(reference)
    assert d_weight == pytest.approx(ref_d_weight, rel=1e-5) and 0 < d_weight and grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, rtol=1e-4, atol=1e-6 * ref.abs().max().item(), msg=name)
