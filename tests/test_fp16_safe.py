"""fp16-safe fine-tuning (``fp16_safe.bound``): a codec made to overflow fp16 (a convolution that
feeds a GroupNorm, scaled up: identical fp32 outputs, inf in fp16) comes out of the fine-tune with
every activation inside the bound, no fp16 fallback, and the original's outputs; the penalty's
value by hand; exact resume; the refusals."""

import warnings

import pytest
import torch
from conftest import assert_user_error
from test_train import args, weights

from codec import Codec
from codec.evaluation.activations import FP16_MAX, ActivationPeaks
from codec.models import build_autoencoder
from codec.precision import PrecisionFallbackWarning
from train.__main__ import main
from train.autoencoder.fp16_safe import BoundedActivations, conv_peaks, groupnorm_fed_convs, rescale_groupnorm_inputs

BLOW_UP = 1e5  # an untrained test codec's GroupNorm-fed convs peak near 2: x 1e5 passes 65504


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(4 / (a - b).pow(2).mean()))  # images in [-1, 1]: peak-to-peak 2


def overflowing(vae):
    """``vae`` with one GroupNorm-fed conv in each half scaled by BLOW_UP (in place)."""
    convs = dict(groupnorm_fed_convs(vae))
    with torch.no_grad():
        for name in ("encoder.down_blocks.1.resnets.0.conv1", "decoder.up_blocks.1.resnets.0.conv1"):
            convs[name].weight.mul_(BLOW_UP)
            convs[name].bias.mul_(BLOW_UP)
    return vae


def round_trip(vae, x):
    with torch.no_grad():
        return vae.decode(vae.encode(x).latent_dist.mean).sample


@pytest.fixture
def codecs(tmp_path):
    """(original, overflowing) test codec folders: the same fp32 outputs."""
    torch.manual_seed(0)
    vae = build_autoencoder("test").eval()
    Codec(vae, device="cpu").save_pretrained(tmp_path / "original")
    Codec(overflowing(vae), device="cpu").save_pretrained(tmp_path / "overflowing")
    return tmp_path / "original", tmp_path / "overflowing"


def test_groupnorm_fed_convs_are_every_resnet_blocks_conv1():
    vae = build_autoencoder("test")
    names = [name for name, _ in groupnorm_fed_convs(vae)]
    blocks = [n for n, m in vae.named_modules() if type(m).__name__ == "ResnetBlock2D"]
    assert names == [f"{b}.conv1" for b in blocks] and any("up_blocks" in n for n in names)


def test_rescaling_keeps_the_outputs_and_brings_the_peaks_inside_the_bound():
    torch.manual_seed(0)
    vae = build_autoencoder("test").eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    reference = round_trip(vae, x)
    overflowing(vae)
    convs = groupnorm_fed_convs(vae)
    assert max(conv_peaks(vae, list(x), convs).values()) > FP16_MAX  # fp16 would give inf here
    assert (round_trip(vae, x) - reference).abs().max() < 1e-4  # fp32 does not notice
    factors = rescale_groupnorm_inputs(vae, list(x), bound=1000)
    assert set(factors) == {"encoder.down_blocks.1.resnets.0.conv1", "decoder.up_blocks.1.resnets.0.conv1"}
    assert max(conv_peaks(vae, list(x), convs).values()) <= 1000 / 8 * (1 + 1e-4)
    assert (round_trip(vae, x) - reference).abs().max() < 1e-4


def test_the_penalty_is_the_squared_excess_over_the_bound_by_hand():
    torch.manual_seed(0)
    vae = build_autoencoder("test")
    x, z = torch.rand(1, 3, 16, 16) * 2 - 1, torch.randn(1, 4, 2, 2)
    outputs = []
    handles = [m.register_forward_hook(lambda m, i, o: outputs.append(o.detach().abs()))
               for name, m in vae.named_modules() if name and not list(m.children())]
    bound = 0.8
    model = BoundedActivations(vae, bound)  # registers its hooks after ours: the same outputs, in order
    _, _, penalty, peaks = model(x, z)
    for h in handles:
        h.remove()
    by_hand = sum(float(((a - bound).clamp(min=0) ** 2).mean()) for a in outputs) / bound ** 2
    assert by_hand > 0 and abs(penalty.item() - by_hand) < 1e-6 * by_hand
    assert float(max(peaks.values())) == pytest.approx(max(float(a.max()) for a in outputs))
    _, _, zero, _ = BoundedActivations(build_autoencoder("test"), 1e4)(x, z)
    assert float(zero) == 0  # nothing beyond the bound: nothing to change


def safe_args(out, data, teacher, *extra):
    return args(out, data, f"model.init_from={teacher}", "fp16_safe.bound=1000", "loss.disc_weight=0",
                "loss.perceptual_weight=0", "ema_decay=0", "optim.lr=1e-5", *extra)


def test_the_fine_tune_removes_every_fp16_fallback_and_keeps_the_outputs(tmp_path, image_folder, codecs):
    original, broken = codecs
    assert main(safe_args(tmp_path / "safe", image_folder, broken, "max_steps=2")) == 0
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    reference = Codec.from_pretrained(original, device="cpu", dtype="fp32")
    ref_latents = reference.encode(x)
    ref_images = reference.decode(ref_latents)

    def fp16_run(folder):
        codec = Codec.from_pretrained(folder, device="cpu", dtype="fp16")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PrecisionFallbackWarning)
            latents = codec.encode(x)
            images = codec.decode(ref_latents)  # the original's latents: the same latent space
        return codec, latents, images

    before, _, _ = fp16_run(broken)
    assert before.fallbacks == 2  # encode and decode each overflowed and were redone in fp32
    safe, latents, images = fp16_run(tmp_path / "safe" / "codec")
    assert safe.fallbacks == 0
    assert psnr(images, ref_images) >= 40
    assert (latents - ref_latents).abs().max() < 0.05 * ref_latents.abs().max()
    fp32 = Codec.from_pretrained(tmp_path / "safe" / "codec", device="cpu")
    peaks = ActivationPeaks(fp32.vae)
    fp32.decode(fp32.encode(x))
    assert max(peaks.result()[k] for k in ("encoder_max_abs", "decoder_max_abs")) <= 1000
    # The teacher's factors and latent space: its latents decode without a mismatch.
    teacher = Codec.from_pretrained(broken, device="cpu")
    assert fp32.vae.config.scaling_factor == teacher.vae.config.scaling_factor
    assert fp32.latent_space["encoder_sha256"] == teacher.latent_space["encoder_sha256"]
    fp32.decode(ref_latents, check=teacher.latent_space)


def test_a_resumed_fine_tune_equals_an_uninterrupted_one(tmp_path, image_folder, codecs):
    _, broken = codecs
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(safe_args(straight, image_folder, broken, "max_steps=4", "fp16_safe.bound=2")) == 0
    assert main(safe_args(resumed, image_folder, broken, "max_steps=2", "fp16_safe.bound=2")) == 0
    assert main(safe_args(resumed, image_folder, broken, "max_steps=4", "fp16_safe.bound=2", "resume=true")) == 0
    a, b = weights(straight / "codec"), weights(resumed / "codec")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("extra,pattern", [
    (["fp16_safe.bound=65504"], "fp16_safe.bound"),
    (["fp16_safe.bound=1e6"], "fp16_safe.bound"),
    (["fp16_safe.bound=-1"], "fp16_safe.bound"),
    (["model.init_from=null"], "set model.init_from"),
    (["loss.disc_weight=0.5"], r"\['loss.disc_weight'\] do not apply"),
    (["model.gradient_checkpointing=true"], "model.gradient_checkpointing"),
])
def test_settings_that_cannot_work_are_refused(tmp_path, image_folder, codecs, capsys, extra, pattern):
    with pytest.raises(SystemExit) as exc:
        main(safe_args(tmp_path / "r", image_folder, codecs[1], "max_steps=1", *extra))
    assert_user_error(capsys, exc.value.code, pattern)
