"""vae-codec export / encode / decode / eval, in-process through main(argv)."""

import json

import numpy as np
import pytest
import torch
from conftest import smooth_image
from diffusers import AutoencoderKL
from PIL import Image
from safetensors import safe_open

from codec import Codec
from codec.cli import main
from codec.models import build_autoencoder


def make_codec(tmp_path):
    torch.manual_seed(0)
    codec = Codec(build_autoencoder("test"), device="cpu")
    codec.set_factors(0.5)
    return codec.save_pretrained(tmp_path / "codec")


def test_encode_decode_round_trip_with_padding(tmp_path, capsys):
    folder = make_codec(tmp_path)
    img = tmp_path / "photo.png"
    Image.fromarray(smooth_image(0, 30, 44)).save(img)  # not a multiple of 8
    lat, out = tmp_path / "photo.latents.safetensors", tmp_path / "recon.png"
    assert main(["encode", "--codec", str(folder), str(img), str(lat)]) == 2  # clear error without --pad
    err = capsys.readouterr().err
    assert "44x30 is not a multiple of 8 pixels; pass --pad" in err and "pad=True" not in err  # CLI words, WxH
    assert main(["encode", "--codec", str(folder), "--pad", str(img), str(lat)]) == 0
    with safe_open(lat, "pt") as f:
        assert f.get_tensor("latents").shape == (1, 4, 4, 6)
        assert f.metadata()["height"] == "30" and float(f.metadata()["scaling_factor"]) == 0.5
    assert main(["decode", "--codec", str(folder), str(lat), str(out)]) == 0
    assert Image.open(out).size == (44, 30)  # cropped back to the original size
    expected = Codec.from_pretrained(folder, device="cpu").reconstruct(
        torch.from_numpy(np.asarray(Image.open(img))).permute(2, 0, 1)[None] / 127.5 - 1, pad=True)
    got = torch.from_numpy(np.asarray(Image.open(out))).permute(2, 0, 1)[None] / 127.5 - 1
    assert (got - expected.clamp(-1, 1)).abs().max() <= 1 / 127.5 + 1e-6  # 8-bit rounding only


def test_decode_writes_every_image_of_a_latents_file(tmp_path):
    from codec.latents_file import save_latents

    folder = make_codec(tmp_path)
    codec = Codec.from_pretrained(folder, device="cpu")
    x = torch.stack([torch.from_numpy(smooth_image(i, 32, 40)).permute(2, 0, 1) for i in range(2)]) / 127.5 - 1
    save_latents(tmp_path / "two.safetensors", codec.encode(x), codec.latent_space)
    assert main(["decode", "--codec", str(folder), str(tmp_path / "two.safetensors"), str(tmp_path / "out.png")]) == 0
    decoded = codec.decode(codec.encode(x))
    for i in range(2):  # numbered, one per latent, each its own image
        got = torch.from_numpy(np.asarray(Image.open(tmp_path / f"out-{i:03d}.png"))).permute(2, 0, 1) / 127.5 - 1
        assert (got - decoded[i].clamp(-1, 1)).abs().max() <= 1 / 127.5 + 1e-6
    assert not (tmp_path / "out.png").exists()


def test_export_run_and_remeasure(tmp_path, image_folder):
    from train.__main__ import main as train_main

    run = tmp_path / "run"
    assert train_main([
        "--set", "model.preset=test", "--set", f"output_dir={run}", "--set", f"data.train={image_folder}",
        "--set", "data.crop_size=32", "--set", "batch_size=2", "--set", "max_steps=2",
        "--set", "loss.perceptual_weight=0", "--set", "data.num_workers=0", "--set", "scale_samples=4",
    ]) == 0
    out = tmp_path / "export"
    assert main(["export", str(run), str(out)]) == 0
    vae = AutoencoderKL.from_pretrained(out)
    meta = json.loads((out / "vae_codec.json").read_text())
    assert vae.config.scaling_factor == meta["latent_stats"]["scaling_factor"] != 1.0
    assert main(["export", str(run), str(out)]) == 2  # refuses to overwrite silently
    assert main(["export", str(run), str(out), "--overwrite", "--data", str(image_folder),
                 "--resolution", "32"]) == 0
    assert main(["export", str(tmp_path / "nothing"), str(tmp_path / "x")]) == 2


def test_eval_writes_metrics(tmp_path, image_folder):
    folder = make_codec(tmp_path)
    (image_folder / "broken.jpg").write_bytes(b"nope")
    out = tmp_path / "ev"
    # --codec repeats: the same folder twice is evaluated twice under distinct names
    assert main(["eval", "--codec", str(folder), "--codec", str(folder), "--data", str(image_folder),
                 "--out", str(out), "--limit", "4", "--no-classical"]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["images"] == 3 and len(report["skipped"]) == 1  # broken.jpg sorts first
    assert list(report["codecs"]) == [str(folder), f"{folder} #2"]
    first, second = report["codecs"].values()
    assert set(first["metrics"]) == {"psnr", "ssim", "ms_ssim", "lpips_alex", "lpips_vgg"}
    assert first["metrics"]["psnr"] == second["metrics"]["psnr"]  # deterministic
    assert (out / "per_image.csv").read_text().count("\n") == 1 + 3 * 2
    assert (out / "report.html").exists()
    assert main(["eval", "--codec", str(folder), "--data", str(image_folder), "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["images"] == 12 and any("broken.jpg" in s for s in report["skipped"])
    assert list(report["codecs"]) == [str(folder), "jpeg", "webp"]
    assert (out / "per_image.csv").read_text().count("\n") == 1 + 12 * 3


def test_a_mistyped_local_codec_path_fails_at_once_without_the_hub(tmp_path, capsys, monkeypatch):
    import time

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("asked the Hub"))
    img = tmp_path / "a.png"
    Image.fromarray(smooth_image(0, 32, 32)).save(img)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for typo in ("runs/tiny/codc", "runs/codc", "./codc", str(tmp_path / "codc")):
        start = time.monotonic()
        assert main(["encode", "--codec", typo, str(img), "x.safetensors"]) == 2
        assert f"{typo}: no such codec folder or file" in capsys.readouterr().err
        assert time.monotonic() - start < 5


def test_hub_ids_are_told_from_local_paths(tmp_path, monkeypatch):
    from codec.models import looks_like_hub_id

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert looks_like_hub_id("stabilityai/sd-vae-ft-mse") and looks_like_hub_id("madebyollin/taesd")
    assert not any(looks_like_hub_id(p) for p in ("runs/t1", "runs/t1/codec", "./a/b", "/a/b", "~/a", "a",
                                                  "org/vae.safetensors"))


def test_reconstruct_writes_the_image_and_says_how_close(tmp_path, capsys):
    from codec.evaluation.metrics import psnr

    folder = make_codec(tmp_path)
    img = tmp_path / "photo.png"
    Image.fromarray(smooth_image(1, 30, 44)).save(img)
    assert main(["reconstruct", "--codec", str(folder), str(img), str(tmp_path / "r.png")]) == 2
    assert "44x30 is not a multiple of 8 pixels; pass --pad" in capsys.readouterr().err
    assert main(["reconstruct", "--codec", str(folder), "--pad", str(img), str(tmp_path / "r.png")]) == 0
    said = capsys.readouterr().out
    x = torch.from_numpy(np.asarray(Image.open(img)).copy()).permute(2, 0, 1)[None] / 127.5 - 1
    expected = psnr(x, Codec.from_pretrained(folder, device="cpu").reconstruct(x, pad=True).clamp(-1, 1)).item()
    assert Image.open(tmp_path / "r.png").size == (44, 30) and f"PSNR {expected:.2f} dB" in said


def test_encode_and_decode_folders_and_globs_record_what_they_skip(tmp_path, capsys):
    folder = make_codec(tmp_path)
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    for i, name in enumerate(["a.png", "b.jpg", "sub/c.png"]):
        Image.fromarray(smooth_image(i, 32, 40)).save(photos / name)
    (photos / "broken.png").write_bytes(b"not an image")
    assert main(["encode", "--codec", str(folder), str(photos), str(tmp_path / "lat")]) == 0
    said = capsys.readouterr()
    assert "4 files -> " in said.out and "3 done, 1 skipped" in said.out and "skipped broken.png" in said.err
    assert sorted(p.relative_to(tmp_path / "lat").as_posix() for p in (tmp_path / "lat").rglob("*.safetensors")) == [
        "a.safetensors", "b.safetensors", "sub/c.safetensors"]
    assert (tmp_path / "lat" / "skipped.tsv").read_text().startswith("broken.png\t")
    assert main(["decode", "--codec", str(folder), str(tmp_path / "lat"), str(tmp_path / "out")]) == 0
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.png")) == [
        "a.png", "b.png", "sub/c.png"]
    one = Codec.from_pretrained(folder, device="cpu")
    x = torch.from_numpy(np.asarray(Image.open(photos / "a.png")).copy()).permute(2, 0, 1)[None] / 127.5 - 1
    got = torch.from_numpy(np.asarray(Image.open(tmp_path / "out" / "a.png")).copy()).permute(2, 0, 1) / 127.5 - 1
    assert (got - one.reconstruct(x)[0].clamp(-1, 1)).abs().max() <= 1 / 127.5 + 1e-6
    assert main(["encode", "--codec", str(folder), str(photos / "*.png"), str(tmp_path / "glob")]) == 0
    assert sorted(p.name for p in (tmp_path / "glob").iterdir()) == ["a.safetensors", "skipped.tsv"]
    assert main(["encode", "--codec", str(folder), str(photos / "*.webp"), str(tmp_path / "none")]) == 2
    assert "matches no" in capsys.readouterr().err


@pytest.mark.parametrize("sample", [False, True], ids=["mean", "sample"])
def test_folders_are_coded_in_batches_with_the_results_of_one_file_at_a_time(tmp_path, monkeypatch, sample):
    """A folder is encoded and decoded a batch of same-sized files at a time (fewer passes than
    files), and every file gets what it gets alone, posterior samples included (one generator per
    image); files of another size, or that fail, do not spoil their neighbours."""
    folder = make_codec(tmp_path)
    photos = tmp_path / "photos"
    photos.mkdir()
    sizes = [(32, 40)] * 5 + [(24, 32)] * 2 + [(32, 40)]
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(smooth_image(i, h, w)).save(photos / f"{i}.png")
    (photos / "3b.png").write_bytes(b"broken")  # between two images of one size
    passes = {"encode": 0, "decode": 0}
    real_posterior, real_decode = Codec.posterior, Codec.decode
    monkeypatch.setattr(Codec, "posterior", lambda self, *a, **k: (passes.__setitem__("encode", passes["encode"] + 1),
                                                                    real_posterior(self, *a, **k))[1])
    monkeypatch.setattr(Codec, "decode", lambda self, *a, **k: (passes.__setitem__("decode", passes["decode"] + 1),
                                                                real_decode(self, *a, **k))[1])
    extra = ["--sample", "--seed", "3"] if sample else []
    lat, out = str(tmp_path / "lat"), str(tmp_path / "out")
    assert main(["encode", "--codec", str(folder), "--batch-size", "3", *extra, str(photos), lat]) == 0
    # 0 1 2 | 3 | (3b fails) | 4 | 5 6 | 7  -> 5 passes for 8 images
    assert passes["encode"] == 5
    assert (tmp_path / "lat" / "skipped.tsv").read_text().startswith("3b.png\t")
    assert main(["decode", "--codec", str(folder), "--batch-size", "3", lat, out]) == 0
    assert passes["decode"] == 4  # 0 1 2 | 3 4 | 5 6 | 7 (sorted names: 0 1 2 3 4 5 6 7)
    for i in range(len(sizes)):
        alone = tmp_path / f"alone{i}.safetensors"
        assert main(["encode", "--codec", str(folder), *extra, str(photos / f"{i}.png"), str(alone)]) == 0
        with safe_open(alone, "pt") as a, safe_open(tmp_path / "lat" / f"{i}.safetensors", "pt") as b:
            torch.testing.assert_close(b.get_tensor("latents"), a.get_tensor("latents"), rtol=0, atol=1e-5)
        assert Image.open(tmp_path / "out" / f"{i}.png").size == sizes[i][::-1]
