"""Training behaviour checked by value: the learning-rate schedule, gradient accumulation and
multi-process training against one big batch, the EMA that is exported, gradient clipping.

Runs use the "test" preset on 8 generated 40x48 images (32x32 crops), fp32, no LPIPS.

Reparameterisation noise: the model samples ``z = mean + std * eps``. To compare runs that
split a batch differently (accumulation, processes) independently of how ``eps`` is drawn,
those runs start from a copy of the test preset whose posterior is (numerically) deterministic:
the log-variance half of ``quant_conv`` outputs -100, clamped by diffusers to -30, so
``std = exp(-15) = 3e-7`` and no gradient flows into the clamped log-variance.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, smooth_image
from PIL import Image
from safetensors.torch import load_file

from train.__main__ import main as train_main
from train.autoencoder.config import load_config
from train.autoencoder.loop import learning_rate

WEIGHTS = "diffusion_pytorch_model.safetensors"
# softmax(q . (k + b)) does not depend on the attention's key bias b: its gradient is exactly 0
# in exact arithmetic, so what a run computes for it is rounding noise, which Adam normalises
# into steps of +-lr. Two runs that add the same gradients in another order disagree there
# (by ~lr) and nowhere else.
ROUNDING_NOISE_ONLY = "attentions.0.to_k.bias"


# ------------------------------------------------------------------------- fixtures and helpers
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Repeatable CPU arithmetic for the numbers compared below."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Exactly 8 images: one batch of 8 (or 2x4, or 2 processes x 4) is one whole epoch, so every
    split of the batch sees the same 8 crops per optimiser step (crops and flips depend only on
    (seed, epoch, index), and the epoch's order only on (seed, epoch))."""
    folder = tmp_path_factory.mktemp("images")
    for i in range(8):
        Image.fromarray(smooth_image(i, 40, 48)).save(folder / f"img{i}.png")
    return folder


@pytest.fixture(scope="module")
def init_folder(tmp_path_factory) -> Path:
    """The test preset with a deterministic posterior (see the module docstring)."""
    from codec.models import build_autoencoder

    torch.manual_seed(0)
    vae = build_autoencoder("test")
    latent = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[latent:] = 0
        vae.quant_conv.bias[latent:] = -100.0
    folder = tmp_path_factory.mktemp("init") / "vae"
    vae.save_pretrained(folder)
    return folder


def sets(out: Path, data: Path, *extra: str) -> list[str]:
    base = [
        "model.preset=test", f"output_dir={out}", f"data.train={data}", "data.crop_size=32",
        "data.num_workers=0", "loss.perceptual_weight=0", "mixed_precision=no", "ema_decay=0",
        "image_every=0", "val_every=0", "scale_samples=2", "log_every=1", "checkpoint_every=1000",
        "optim.lr=1e-3",
    ]
    return [x for item in (*base, *extra) for x in ("--set", item)]


def run(out: Path, data: Path, *extra: str) -> Path:
    assert train_main(sets(out, data, *extra)) == 0
    return out


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / WEIGHTS)


def log_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines() if line.strip()]


def assert_same_weights(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    compared = [k for k in a if ROUNDING_NOISE_ONLY not in k]
    assert len(compared) >= len(a) - 2  # only the two attention key biases are left out
    worst = max(compared, key=lambda k: (a[k] - b[k]).abs().max().item())
    diff = (a[worst] - b[worst]).abs().max().item()
    assert diff <= atol, f"{worst} differs by {diff:.3g} (> {atol:g})"


# ------------------------------------------------------------------------- 1. learning rate
def lr_cfg(*overrides: str):
    return load_config(None, list(overrides))


def test_learning_rate_schedule_values():
    base, r = 2e-3, 0.1
    cfg = lr_cfg("optim.warmup_steps=10", "optim.schedule=cosine", f"optim.min_lr_ratio={r}", "max_steps=110")
    # linear warm-up: base * (step + 1) / warmup_steps
    assert learning_rate(cfg, 0, base) == pytest.approx(2e-4, rel=1e-12)
    assert learning_rate(cfg, 4, base) == pytest.approx(1e-3, rel=1e-12)
    assert learning_rate(cfg, 9, base) == pytest.approx(2e-3, rel=1e-12)
    # cosine over max_steps - warmup_steps = 100 steps, from base down to r * base
    assert learning_rate(cfg, 10, base) == pytest.approx(base, rel=1e-12)
    assert learning_rate(cfg, 35, base) == pytest.approx(base * (r + (1 - r) * 0.5 * (1 + math.sqrt(0.5))))
    assert learning_rate(cfg, 60, base) == pytest.approx(base * (r + (1 - r) * 0.5), rel=1e-12)  # midpoint
    assert learning_rate(cfg, 60, base) == pytest.approx(1.1e-3, rel=1e-12)
    assert learning_rate(cfg, 109, base) == pytest.approx(base * (r + (1 - r) * 0.5 * (1 + math.cos(0.99 * math.pi))))
    assert learning_rate(cfg, 110, base) == pytest.approx(r * base, rel=1e-12)  # the end of the decay
    assert learning_rate(cfg, 500, base) == pytest.approx(r * base, rel=1e-12)  # and it stays there
    lrs = [learning_rate(cfg, s, base) for s in range(111)]
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))  # rising through the warm-up
    assert lrs[9] == lrs[10] == base  # the warm-up's last step and the decay's first both use base
    assert all(a > b for a, b in zip(lrs[10:110], lrs[11:111]))  # then strictly decaying

    constant = lr_cfg("optim.warmup_steps=4", "optim.schedule=constant", "max_steps=50")
    assert [learning_rate(constant, s, 1.0) for s in (0, 1, 2, 3)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert learning_rate(constant, 4, 1.0) == 1.0 and learning_rate(constant, 49, 1.0) == 1.0
    assert learning_rate(constant, 1000, 1.0) == 1.0

    no_warmup = lr_cfg("optim.warmup_steps=0", "optim.schedule=cosine", "optim.min_lr_ratio=0.5", "max_steps=4")
    assert [learning_rate(no_warmup, s, 1.0) for s in range(5)] == pytest.approx(
        [1.0, 0.5 + 0.5 * 0.5 * (1 + math.cos(math.pi / 4)), 0.75, 0.5 + 0.5 * 0.5 * (1 + math.cos(0.75 * math.pi)),
         0.5])


def test_logged_lr_is_the_schedule_applied(tmp_path, data):
    """The lr logged at step N is the one the optimiser step producing step N used, i.e.
    learning_rate(cfg, N - 1, base); with scale_lr, base = lr x processes x batch x accumulation."""
    out = run(tmp_path / "run", data, "batch_size=2", "grad_accum=2", "max_steps=6", "log_every=2",
              "optim.warmup_steps=3", "optim.schedule=cosine", "optim.min_lr_ratio=0.1", "optim.scale_lr=true")
    logged = {line["step"]: line["lr"] for line in log_lines(out)}
    assert sorted(logged) == [1, 2, 4, 6]  # step 1 and every log_every
    base = 1e-3 * 1 * 2 * 2
    expected = {1: base / 3, 2: base * 2 / 3, 4: base, 6: base * (0.1 + 0.9 * 0.25)}  # step 6: cos(2 pi / 3)
    assert logged == pytest.approx(expected, rel=1e-9)
    cfg = load_config(out / "config.yaml")
    assert logged == pytest.approx({n: learning_rate(cfg, n - 1, base) for n in logged}, rel=1e-12)


# ------------------------------------------------------------------------- 2. and 3. batch splits
@pytest.fixture(scope="module")
def one_batch_of_8(tmp_path_factory, data, init_folder) -> Path:
    out = tmp_path_factory.mktemp("batch8") / "run"
    return run(out, data, f"model.init_from={init_folder}", "batch_size=8", "grad_accum=1", "max_steps=2")


def check_same_training(reference: Path, other: Path, init_folder: Path) -> None:
    a, b = weights(reference / "codec"), weights(other / "codec")
    moved = max((a[k] - v).abs().max().item() for k, v in weights(init_folder).items())
    assert moved > 1e-3  # two steps at lr 1e-3 moved the weights 100x further than the tolerance
    assert_same_weights(a, b, atol=1e-5)
    # The pre-clip gradient norm of each step: catches a loss scaled by the accumulation/process
    # count, to which Adam's weights are blind.
    norms_a = [line["grad_norm"] for line in log_lines(reference)]
    norms_b = [line["grad_norm"] for line in log_lines(other)]
    assert len(norms_a) == 2 and norms_b == pytest.approx(norms_a, rel=1e-5)


def test_grad_accumulation_equals_the_big_batch(tmp_path, data, init_folder, one_batch_of_8):
    """grad_accum=2 x batch 4 == batch 8 after 2 optimiser steps (same 8 crops per step)."""
    out = run(tmp_path / "accum", data, f"model.init_from={init_folder}", "batch_size=4", "grad_accum=2",
              "max_steps=2")
    check_same_training(one_batch_of_8, out, init_folder)


@pytest.mark.slow
def test_two_processes_equal_the_big_batch(tmp_path, data, init_folder, one_batch_of_8):
    """`accelerate launch --cpu --num_processes 2` x batch 4 == 1 process x batch 8: the two ranks
    take alternate items of the same epoch order and DDP averages their gradients."""
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "train", *sets(out, data, f"model.init_from={init_folder}", "batch_size=4", "max_steps=2"),
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    check_same_training(one_batch_of_8, out, init_folder)


# ------------------------------------------------------------------------- 4. EMA export
def ema_decays(steps: int, cap: float) -> list[float]:
    """diffusers EMAModel's decay at optimisation steps 1..steps (update_after_step=0, no
    use_ema_warmup): 0 at the first step, then (1 + s) / (10 + s) with s = step - 1, capped."""
    return [0.0] + [min(cap, (1 + s) / (10 + s)) for s in range(1, steps)]


def test_exported_codec_is_the_ema_of_the_trained_weights(tmp_path, data):
    from codec.models import build_autoencoder

    steps, cap = 4, 0.2  # decays 0, 2/11, min(0.2, 3/12), min(0.2, 4/13): the cap is reached
    out = run(tmp_path / "run", data, f"ema_decay={cap}", "batch_size=2", "grad_accum=2",
              f"max_steps={steps}", "checkpoint_every=1", f"keep_checkpoints={steps}")
    ckpts = [out / "checkpoints" / f"step_{k:08d}" for k in range(1, steps + 1)]
    raw = [{k.removeprefix("vae."): v for k, v in load_file(c / "model.safetensors").items()} for c in ckpts]
    exported = weights(out / "codec")
    assert exported.keys() == raw[-1].keys()

    # The EMA of the raw weights after each optimiser step (not micro-batch), by hand.
    ema = dict(raw[0])
    for decay, params in zip(ema_decays(steps, cap), raw):
        ema = {k: decay * ema[k] + (1 - decay) * params[k] for k in ema}
    for k in exported:
        torch.testing.assert_close(exported[k], ema[k], rtol=0, atol=1e-6, msg=k)

    # ... is exactly the shadow saved in the last checkpoint (in parameter order) ...
    names = [name for name, _ in build_autoencoder("test").named_parameters()]
    state = load_file(ckpts[-1] / "train_state.safetensors")
    shadow = {name: state[f"ema.shadow_params.{i}"] for i, name in enumerate(names)}
    assert shadow.keys() == exported.keys()
    assert all(torch.equal(exported[k], shadow[k]) for k in exported)
    assert all(torch.equal(exported[k], v) for k, v in weights(ckpts[-1] / "codec").items())
    # ... and not the raw trained weights.
    gap = max((exported[k] - raw[-1][k]).abs().max().item() for k in exported)
    assert gap > 1e-4, gap
    meta = json.loads((out / "codec" / "vae_codec.json").read_text())
    assert meta["ema"] is True and meta["step"] == steps


# ------------------------------------------------------------------------- 5. clipping
def params_with_grads() -> list[torch.nn.Parameter]:
    a, b, frozen = (torch.nn.Parameter(torch.zeros(s)) for s in ((2,), (1, 1), (3,)))
    a.grad = torch.tensor([3.0, 4.0])
    b.grad = torch.tensor([[12.0]])  # total norm sqrt(9 + 16 + 144) = 13
    return [a, b, frozen]  # frozen.grad is None


def test_clip_caps_the_norm_and_returns_the_norm_before():
    from train.common.steps import clip_gradients

    params = params_with_grads()
    assert clip_gradients(params, 1.0) == pytest.approx(13.0, rel=1e-6)
    after = torch.cat([p.grad.flatten() for p in params[:2]])
    assert after.norm().item() <= 1.0 + 1e-6
    torch.testing.assert_close(after, torch.tensor([3.0, 4.0, 12.0]) / 13, rtol=1e-5, atol=0)  # same direction
    assert params[2].grad is None

    for max_norm in (0.0, 100.0):  # off, or above the norm: gradients untouched
        params = params_with_grads()
        assert clip_gradients(params, max_norm) == pytest.approx(13.0, rel=1e-6)
        assert params[0].grad.tolist() == [3.0, 4.0] and params[1].grad.tolist() == [[12.0]]


def test_clipping_in_a_run(tmp_path, data, init_folder):
    """Adam's first step is lr * g / (|g| + eps) per weight (eps = 1e-8): about lr wherever the
    gradient is far above eps, but at most lr * 1e-9 / (1e-9 + 1e-8) = lr / 11 once the whole
    gradient is clipped to norm 1e-9. The logged grad_norm is the norm before clipping."""
    lr = 1e-3
    init = weights(init_folder)
    outs = {}
    for name, max_norm in (("free", 0), ("clipped", 1e-9)):
        outs[name] = run(tmp_path / name, data, f"model.init_from={init_folder}", "max_steps=1", "batch_size=4",
                         f"optim.lr={lr}", f"optim.max_grad_norm={max_norm}")
    step = {name: max((weights(out / "codec")[k] - v).abs().max().item() for k, v in init.items())
            for name, out in outs.items()}
    assert step["free"] > 0.9 * lr
    assert step["clipped"] <= lr / 11 * 1.001, step
    (free,), (clipped,) = log_lines(outs["free"]), log_lines(outs["clipped"])
    assert clipped["grad_norm"] > 1.0  # logged before clipping, not the clipped 1e-9
    assert clipped["grad_norm"] == pytest.approx(free["grad_norm"], rel=1e-5)


def test_grad_norm_logged_at_every_logged_step_when_clipping(tmp_path, data):
    out = run(tmp_path / "run", data, "max_steps=4", "log_every=2", "batch_size=4", "optim.max_grad_norm=0.5")
    lines = log_lines(out)
    assert [line["step"] for line in lines] == [1, 2, 4]
    assert all(math.isfinite(line["grad_norm"]) and line["grad_norm"] > 0 for line in lines)
