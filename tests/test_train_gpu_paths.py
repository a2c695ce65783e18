"""Training paths that only GPUs take, checked on the CPU with stand-ins: torch's CPU GradScaler
for fp16 loss scaling, the "meta" device for a device other than the checkpoint's, a faked CUDA
capability for ``mixed_precision: auto``."""

import json

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from diffusers.training_utils import EMAModel

from train.common import checkpoints as ckpt
from train.common.session import place_on, resolve_mixed_precision


@pytest.fixture
def fp16_accelerator():
    """An Accelerator that scales losses like fp16 on a GPU, with torch's CPU GradScaler."""
    AcceleratorState._reset_state(reset_partial_state=True)
    acc = Accelerator(cpu=True, mixed_precision="fp16")
    acc.scaler, acc.native_amp = torch.amp.GradScaler("cpu", init_scale=1024.0), True
    yield acc
    AcceleratorState._reset_state(reset_partial_state=True)


def gan_pair(acc):
    """A generator and a discriminator (one linear layer each) with SGD(lr=1), prepared."""
    torch.manual_seed(0)
    gen, disc = torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)
    opt_g, opt_d = torch.optim.SGD(gen.parameters(), lr=1.0), torch.optim.SGD(disc.parameters(), lr=1.0)
    return acc.prepare(gen, disc, opt_g, opt_d)


@pytest.mark.parametrize("max_norm", [0.0, 1e9, 1.0])
def test_fp16_clipping_unscales_each_optimiser_once(fp16_accelerator, max_norm):
    """Generator and discriminator each get their true gradient, clipped to max_norm (the
    discriminator's used to be divided by the loss scale a second time: 1/1024 here)."""
    from train.common.steps import step_optimisers

    acc = fp16_accelerator
    gen, disc, opt_g, opt_d = gan_pair(acc)
    before = [m.weight.detach().clone() for m in (gen, disc)]
    x = torch.ones(2, 4)
    acc.backward(3 * gen(x).sum() + disc(x).sum())  # d/dW: 6 per weight for gen, 2 for disc
    assert disc.weight.grad[0, 0].item() == 2 * 1024  # scaled, as under fp16
    groups = [(opt_g, list(gen.parameters()), 1.0), (opt_d, list(disc.parameters()), 1.0)]
    norm, stepped = step_optimisers(acc, groups, max_norm, measure=True)
    assert stepped
    true_norm = (4 * 6**2 + 6**2) ** 0.5  # gen weight (4 entries) and bias, unscaled
    assert norm == pytest.approx(true_norm, rel=1e-6)
    for module, w0, g in ((gen, before[0], 6.0), (disc, before[1], 2.0)):
        full = (5 * g**2) ** 0.5
        expected = g * min(1.0, max_norm / full) if max_norm > 0 else g
        torch.testing.assert_close(w0 - module.weight.detach(), torch.full_like(w0, expected), rtol=1e-5, atol=0)


def one_step_run(acc, gen, disc, opt_g, opt_d, tmp_path):
    """What ``train.autoencoder.loop.optimiser_step`` reads of a run, with an EMA of the generator."""
    from types import SimpleNamespace

    from train.autoencoder.config import TrainConfig
    from train.common.guards import NonFiniteGuard
    from train.common.session import TrainState

    return SimpleNamespace(cfg=TrainConfig(), accelerator=acc, guard=NonFiniteGuard(5), ckpt_dir=tmp_path,
                           state=TrainState(), opt_g=opt_g, trainable=list(gen.parameters()), base_lr=1.0,
                           opt_d=opt_d, disc=disc, base_disc_lr=1.0, ema=EMAModel(gen.parameters(), decay=0.5),
                           raw_vae=gen, gen_loss=None, is_main=True)


def test_fp16_generator_overflow_skips_it_and_its_ema_and_leaves_the_discriminator_exact(fp16_accelerator, tmp_path):
    """The generator's scaled gradients overflow, the discriminator's do not: the generator and its
    EMA are not stepped, the discriminator gets its true gradient (it used to be unscaled with the
    scale that had just backed off: 2x), and the scale backs off once."""
    from train.autoencoder.loop import optimiser_step

    acc = fp16_accelerator
    gen, disc, opt_g, opt_d = gan_pair(acc)
    run = one_step_run(acc, gen, disc, opt_g, opt_d, tmp_path)
    before = [m.weight.detach().clone() for m in (gen, disc)]
    shadow = [p.clone() for p in run.ema.shadow_params]
    x = torch.ones(2, 4)
    acc.backward(1e36 * gen(x).sum() + disc(x).sum())  # x 1024: beyond fp32 for the generator
    assert not torch.isfinite(gen.weight.grad).all() and disc.weight.grad[0, 0].item() == 2 * 1024
    optimiser_step(run, {}, nonfinite=False, disc_on=True)
    torch.testing.assert_close(gen.weight.detach(), before[0], rtol=0, atol=0)
    torch.testing.assert_close(before[1] - disc.weight.detach(), torch.full_like(before[1], 2.0), rtol=1e-6, atol=0)
    assert acc.scaler.get_scale() == 512.0
    assert run.ema.optimization_step == 0 and all(torch.equal(a, b) for a, b in zip(shadow, run.ema.shadow_params))
    acc.backward(gen(x).sum() + disc(x).sum())  # a finite step: both move, and so does the EMA
    optimiser_step(run, {}, nonfinite=False, disc_on=True)
    assert run.ema.optimization_step == 1 and not torch.equal(gen.weight.detach(), before[0])


def test_fp16_scale_grows_after_growth_interval_steps_not_half_as_many(fp16_accelerator):
    """One scaler update per step, whatever the number of optimisers (accelerate's optimiser.step()
    updates after each: the scale grew every growth_interval / 2 steps with a discriminator)."""
    from train.common.steps import step_optimisers

    acc = fp16_accelerator
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=2)
    gen, disc, opt_g, opt_d = gan_pair(acc)
    groups = [(opt_g, list(gen.parameters()), 1.0), (opt_d, list(disc.parameters()), 1.0)]
    scales = []
    for _ in range(2):
        acc.backward(gen(torch.ones(2, 4)).sum() + disc(torch.ones(2, 4)).sum())
        step_optimisers(acc, groups, 0.0)
        opt_g.zero_grad(), opt_d.zero_grad()
        scales.append(acc.scaler.get_scale())
    assert scales == [1024.0, 2048.0]


def test_fp16_overflow_with_eq_vae_is_logged_finite(fp16_accelerator):
    """Under an overflowing loss scale the GAN surrogate is NaN while its value is finite; with the
    EQ-VAE term added, the logged loss must still be the finite value (a NaN would count the step
    as non-finite, and five in a row stop the run, instead of the scaler backing off)."""
    import math

    from codec.models import build_autoencoder
    from train.autoencoder.config import TrainConfig
    from train.autoencoder.discriminator import PatchDiscriminator
    from train.autoencoder.losses import GeneratorLoss, loss_scale
    from train.autoencoder.recipes import StepContext
    from train.autoencoder.recipes.klf8 import Autoencoder, KLF8Recipe

    acc = fp16_accelerator
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=1e36)
    cfg = TrainConfig()
    cfg.loss.perceptual_weight, cfg.loss.disc_weight, cfg.loss.disc_start = 0.0, 0.5, 0
    cfg.loss.equivariance_weight, cfg.loss.equivariance_transforms = 0.5, ["rot90"]
    cfg.loss.equivariance_mode = "additive"
    cfg.loss.logvar_init = -20.0  # nll = rec · e^20: finite, but x 1e36 its gradients are beyond fp32
    torch.manual_seed(0)
    vae = build_autoencoder("test")
    ctx = StepContext(model=Autoencoder(vae), raw_model=vae, step=0, rank=0, gen_loss=GeneratorLoss(cfg.loss, None),
                      disc=PatchDiscriminator(channels=8, layers=2), last_layer=vae.decoder.conv_out.weight,
                      grad_scale=loss_scale(acc))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    result = KLF8Recipe(cfg).loss(ctx, x, {})
    loss, logs = result.loss, result.logs
    assert not torch.isfinite(loss)  # the overflow, for the scaler to skip
    assert math.isfinite(logs["loss"])
    assert logs["loss"] == pytest.approx(logs["nll"] + 0.5 * logs["d_weight"] * logs["g_loss"]
                                         + 0.5 * logs["equivariance"], rel=1e-4, abs=1e-3)


def test_a_resumed_ema_lives_on_the_training_device(tmp_path):
    """Checkpoints load onto the CPU; the EMA must follow the model to its device before its
    first step. "meta" stands in for a GPU: any device other than the checkpoint's."""
    params = [torch.nn.Parameter(torch.randn(3, 2)) for _ in range(2)]
    saved = EMAModel(params, decay=0.9)
    ckpt.save_objects(tmp_path, {"ema": saved})
    on_device = [torch.nn.Parameter(p.detach().to("meta")) for p in params]
    ema = EMAModel(on_device, decay=0.9)
    ema.to(device="meta")  # what the loop does before resuming
    ckpt.load_objects(tmp_path, {"ema": ema})
    assert {p.device.type for p in ema.shadow_params} == {"cpu"}  # the defect, without placement
    place_on({"ema": ema, "other": object()}, torch.device("meta"))
    assert {p.device.type for p in ema.shadow_params} == {"meta"}
    ema.step(on_device)  # mixing devices would raise here


def test_auto_precision_picks_fp16_on_gpus_that_only_emulate_bf16(monkeypatch):
    calls = []

    def is_bf16_supported(including_emulation=True):  # a pre-Ampere GPU (e.g. a T4 or V100)
        calls.append(including_emulation)
        return including_emulation

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert resolve_mixed_precision("auto") == "fp16" and calls == [False]
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # Ampere+
    assert resolve_mixed_precision("auto") == "bf16"
    assert resolve_mixed_precision("no") == "no"


def test_the_discriminator_optimiser_uses_the_configured_weight_decay(tmp_path):
    from PIL import Image

    from train.autoencoder.config import load_config
    from train.autoencoder.state import build_run

    for i in range(2):
        Image.new("RGB", (32, 32), (40 * i, 80, 120)).save(tmp_path / f"{i}.png")
    cfg = load_config(None, ["model.preset=test", "loss.disc_weight=0.5", "loss.perceptual_weight=0",
                             "optim.weight_decay=0.003", f"output_dir={tmp_path / 'run'}", f"data.train={tmp_path}"])
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        run, _, _ = build_run(cfg, Accelerator(cpu=True), None)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert [g["weight_decay"] for g in run.opt_d.param_groups] == [0.003]  # not AdamW's default 0.01
    assert [g["weight_decay"] for g in run.opt_g.param_groups] == [0.003]


def test_the_gpu_figures_script_runs_anywhere(capsys):
    """scripts/gpu_check.py is meant for a GPU; its --device cpu smoke run keeps it working."""
    from scripts.gpu_check import main

    assert main(["--device", "cpu", "--preset", "test", "--size", "32", "--batch", "2", "--steps", "8",
                 "--warmup", "1", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{\n") : out.index("\n\n|")])  # after the training runs' own lines
    assert result["train_images_per_s"] > 0 and result["encode"]["images_per_s"] > 0
    assert result["decode"]["images_per_s"] > 0 and "| cpu | test | 32² | no |" in out


@pytest.mark.parametrize("device", ["cpu", "cuda:1"])
def test_the_gpu_figures_script_refuses_a_device_training_would_not_use(monkeypatch, capsys, device):
    """Training runs on accelerate's device (GPU 0 where CUDA is present): a table that labels
    its training figure with another device would be wrong, so the script refuses."""
    from scripts.gpu_check import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(SystemExit) as stop:
        main(["--device", device, "--precision", "no"])
    assert stop.value.code == 2 and "accelerate's device" in capsys.readouterr().err
