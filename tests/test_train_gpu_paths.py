"""Training paths that only GPUs take, checked on the CPU with stand-ins: torch's CPU GradScaler
for fp16 loss scaling, the "meta" device for a device other than the checkpoint's, a faked CUDA
capability for ``mixed_precision: auto``."""

import json

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from diffusers.training_utils import EMAModel

from train import checkpoints as ckpt
from train.run import place_on, resolve_mixed_precision


@pytest.fixture
def fp16_accelerator():
    """An Accelerator that scales losses like fp16 on a GPU, with torch's CPU GradScaler."""
    AcceleratorState._reset_state(reset_partial_state=True)
    acc = Accelerator(cpu=True, mixed_precision="fp16")
    acc.scaler, acc.native_amp = torch.amp.GradScaler("cpu", init_scale=1024.0), True
    yield acc
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("max_norm", [0.0, 1e9, 1.0])
def test_fp16_clipping_unscales_each_optimiser_once(fp16_accelerator, max_norm):
    """Generator and discriminator each get their true gradient, clipped to max_norm (the
    discriminator's used to be divided by the loss scale a second time: 1/1024 here)."""
    from train.loop import step_optimisers

    acc = fp16_accelerator
    torch.manual_seed(0)
    gen, disc = torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)
    opt_g, opt_d = torch.optim.SGD(gen.parameters(), lr=1.0), torch.optim.SGD(disc.parameters(), lr=1.0)
    gen, disc, opt_g, opt_d = acc.prepare(gen, disc, opt_g, opt_d)
    before = [m.weight.detach().clone() for m in (gen, disc)]
    x = torch.ones(2, 4)
    acc.backward(3 * gen(x).sum() + disc(x).sum())  # d/dW: 6 per weight for gen, 2 for disc
    assert disc.weight.grad[0, 0].item() == 2 * 1024  # scaled, as under fp16
    groups = [(opt_g, list(gen.parameters()), 1.0), (opt_d, list(disc.parameters()), 1.0)]
    norm = step_optimisers(acc, groups, max_norm, measure=True)
    true_norm = (4 * 6**2 + 6**2) ** 0.5  # gen weight (4 entries) and bias, unscaled
    assert norm == pytest.approx(true_norm, rel=1e-6)
    for module, w0, g in ((gen, before[0], 6.0), (disc, before[1], 2.0)):
        full = (5 * g**2) ** 0.5
        expected = g * min(1.0, max_norm / full) if max_norm > 0 else g
        torch.testing.assert_close(w0 - module.weight.detach(), torch.full_like(w0, expected), rtol=1e-5, atol=0)


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

    from train.config import load_config
    from train.loop import build_run

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

    assert main(["--device", "cpu", "--preset", "test", "--size", "32", "--batch", "2", "--steps", "2",
                 "--warmup", "1", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{\n") : out.index("\n\n|")])  # after the training runs' own lines
    assert result["train_images_per_s"] > 0 and result["encode"]["images_per_s"] > 0
    assert result["decode"]["images_per_s"] > 0 and "| cpu | test | 32² | no |" in out
