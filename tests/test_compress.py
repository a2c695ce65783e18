"""vae-codec compress / verify / decompress / scale, in-process through main(argv), plus one
real two-process run under accelerate."""

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, shared, smooth_image
from PIL import Image
from safetensors import safe_open

from codec import Codec, LatentDataset
from codec.cli import main
from codec.images import load_image
from codec.latents import compress as cp
from codec.latents import inputs
from codec.latents import shards as sh
from codec.latents.shards import sha256_file
from codec.models import build_autoencoder


@pytest.fixture(scope="module")
def codec_dir(tmp_path_factory):
    torch.manual_seed(0)
    codec = Codec(build_autoencoder("test"), device="cpu")
    codec.set_factors(0.5, 0.1)  # factors must be applied to what is stored
    return codec.save_pretrained(tmp_path_factory.mktemp("codec") / "codec")


def run(codec_dir, src, out, *extra, workers=0):
    return main(["compress", "--codec", str(codec_dir), "--input", str(src), "--output", str(out),
                 "--num-workers", str(workers), "--no-progress", *extra])


def encode_like_the_job(codec_dir, path, resolution, store_dtype=torch.float32):
    x, _, _ = inputs.fit(load_image(path), resolution)
    codec = Codec.from_pretrained(codec_dir, device="cpu")
    return codec.encode(x[None].float() / 127.5 - 1)[0].to(store_dtype).float()


def all_keys(out):
    manifest = sh.load_manifest(out)
    encoded = [k for s in manifest["shards"] for k in s["keys"]]
    return encoded + [s["key"] for s in manifest["skipped"]]


def test_fit_resizes_short_side_and_centre_crops():
    img = Image.fromarray(smooth_image(0, 40, 64))
    x, size, crop = inputs.fit(img, 32)  # 40x64 -> 32x51 -> crop 32x32 at left (51-32)//2
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8 and size == [40, 64] and crop == [0, 9]
    # native size: cropped down to multiples of 8
    x, size, crop = inputs.fit(Image.fromarray(smooth_image(0, 45, 61)), None)
    assert x.shape == (3, 40, 56) and size == [45, 61] and crop == [2, 2]
    assert torch.equal(x, torch.from_numpy(smooth_image(0, 45, 61)[2:42, 2:58]).permute(2, 0, 1))


def test_compress_fixed_resolution_with_workers(codec_dir, image_folder, tmp_path, capsys):
    out = tmp_path / "lat"
    assert run(codec_dir, image_folder, out, "--resolution", "32", "--shard-size", "5",
               "--latent-dtype", "fp32", workers=2) == 0
    assert "12 inputs = 12 encoded + 0 skipped; 3 shards" in capsys.readouterr().out
    assert main(["verify", str(out)]) == 0
    assert "OK, 12 inputs" in capsys.readouterr().out
    manifest = sh.load_manifest(out)
    assert manifest["codec"]["scaling_factor"] == 0.5 and manifest["codec"]["shift_factor"] == 0.1
    assert manifest["settings"]["resolution"] == 32
    assert manifest["codec"]["config"]["latent_channels"] == 4
    assert [s["latent_shape"] for s in manifest["shards"]] == [[4, 4, 4]] * 3
    ds = LatentDataset(out)
    keys = [ds[i]["key"] for i in range(len(ds))]
    assert keys == sorted(p.relative_to(image_folder).as_posix() for p in image_folder.rglob("*.*"))
    i = keys.index("sub/img00.png")
    expected = encode_like_the_job(codec_dir, image_folder / "sub" / "img00.png", 32)
    assert torch.allclose(ds[i]["latents"], expected, atol=1e-5)
    assert ds[i]["original_size"].tolist() == [40, 48]


def test_native_size_groups_shards_by_latent_shape(codec_dir, image_folder, tmp_path):
    Image.fromarray(smooth_image(99, 45, 61)).save(image_folder / "odd.png")
    Image.fromarray(smooth_image(98, 6, 30)).save(image_folder / "tiny.png")
    out = tmp_path / "lat"
    assert run(codec_dir, image_folder, out, "--latent-dtype", "fp16") == 0
    manifest = sh.load_manifest(out)
    assert manifest["summary"]["latent_shapes"] == {
        "4x5x6": 2, "4x5x7": 3, "4x6x6": 2, "4x6x7": 2, "4x7x6": 2, "4x7x7": 2}
    [skipped] = manifest["skipped"]
    assert skipped["key"] == "tiny.png" and "smaller than 8x8" in skipped["reason"]
    for shard in manifest["shards"]:  # each shard holds one shape; the name says which
        with safe_open(str(out / shard["file"]), "pt") as f:
            assert f.get_slice("latents").get_shape()[1:] == shard["latent_shape"]
            assert f.get_slice("latents").get_dtype() == "F16"
    ds = LatentDataset(out)
    odd = next(ds[i] for i in range(len(ds)) if ds[i]["key"] == "odd.png")
    assert odd["latents"].shape == (4, 5, 7) and odd["crop_top_left"].tolist() == [2, 2]
    expected = encode_like_the_job(codec_dir, image_folder / "odd.png", None, torch.float16)
    assert torch.allclose(odd["latents"], expected, atol=1e-3)
    by_shape = ds.indices_by_shape()
    assert sorted(len(v) for v in by_shape.values()) == [2, 2, 2, 2, 2, 3]


def write_bad_inputs(folder: Path) -> None:
    folder.mkdir()
    good = Image.fromarray(smooth_image(1, 32, 40))
    (folder / "empty.jpg").write_bytes(b"")
    buf = io.BytesIO()
    good.save(buf, "JPEG")
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (folder / "text.jpg").write_text("this is not a picture\n")
    Image.fromarray(smooth_image(2, 64, 80)).save(folder / "bomb.png")  # over the limit set below
    good.convert("CMYK").save(folder / "cmyk.jpg")
    grey16 = (np.arange(32 * 40).reshape(32, 40) * 50).astype(np.uint16)
    Image.fromarray(grey16).save(folder / "grey16.png")
    good.convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.png")
    frames = [good, Image.fromarray(smooth_image(3, 32, 40))]
    frames[0].save(folder / "animated.png", save_all=True, append_images=frames[1:], duration=100)
    assert Image.open(folder / "animated.png").n_frames == 2
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape 40x32, shown rotated: portrait 32x40
    good.save(folder / "rotated.jpg", exif=exif)
    Image.fromarray(smooth_image(4, 4, 4)).save(folder / "tiny.png")  # upscaled at --resolution


def test_bad_inputs_are_converted_or_skipped_with_a_reason(
    codec_dir, tmp_path, monkeypatch, capsys
):
    src, out = tmp_path / "bad", tmp_path / "lat"
    write_bad_inputs(src)
    # PIL refuses images over 2 x MAX_IMAGE_PIXELS: 64x80 = 5120 > 4000 >= every other image.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)
    assert run(codec_dir, src, out, "--resolution", "16") == 0
    printed = capsys.readouterr().out
    assert "10 inputs = 6 encoded + 4 skipped" in printed and "skipped empty.jpg" in printed
    manifest = sh.load_manifest(out)
    reasons = {s["key"]: s["reason"] for s in manifest["skipped"]}
    assert sorted(reasons) == ["bomb.png", "empty.jpg", "text.jpg", "truncated.jpg"]
    assert "too large to decode safely" in reasons["bomb.png"]
    for key in ("empty.jpg", "text.jpg", "truncated.jpg"):
        assert "cannot read image" in reasons[key]
    ds = LatentDataset(out)
    items = {ds[i]["key"]: ds[i] for i in range(len(ds))}
    assert sorted(items) == [
        "animated.png", "cmyk.jpg", "grey16.png", "palette.png", "rotated.jpg", "tiny.png"]
    assert items["rotated.jpg"]["original_size"].tolist() == [40, 32]  # EXIF orientation applied
    assert items["tiny.png"]["original_size"].tolist() == [4, 4]
    assert all(torch.isfinite(it["latents"]).all() for it in items.values())
    assert main(["verify", str(out)]) == 0


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file_is_skipped(codec_dir, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(smooth_image(0, 16, 16)).save(src / "ok.png")
    Image.fromarray(smooth_image(1, 16, 16)).save(src / "locked.png")
    (src / "locked.png").chmod(0)
    try:
        assert run(codec_dir, src, tmp_path / "lat") == 0
    finally:
        (src / "locked.png").chmod(0o644)
    skipped = sh.load_manifest(tmp_path / "lat")["skipped"]
    assert [s["key"] for s in skipped] == ["locked.png"]
    assert "Permission denied" in skipped[0]["reason"]


def test_killed_job_resumes_without_redoing_or_losing_anything(
    codec_dir, image_folder, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "lat"
    # Native size: several shards per chunk.
    args = dict(shard_size=4, num_workers=0, progress=False)
    real_write, calls = sh.write_shard, []

    def dies_on_the_fifth_shard(*a, **k):
        calls.append(a[1])
        if len(calls) == 5:  # chunk 1 has written some of its shards but not its record
            (out / a[1]).with_name("x" + sh.TMP_MARK + "1").write_bytes(b"half a shard")
            raise KeyboardInterrupt
        return real_write(*a, **k)

    monkeypatch.setattr(sh, "write_shard", dies_on_the_fifth_shard)
    with pytest.raises(KeyboardInterrupt):
        cp.compress(codec_dir, image_folder, out, **args)
    assert not (out / "manifest.json").exists()
    assert sh.load_record(out, 0) and not sh.load_record(out, 1)
    done = {p: p.stat().st_mtime_ns for p in (out / "shards").glob("000000-*")}
    monkeypatch.setattr(sh, "write_shard", real_write)
    summary = cp.compress(codec_dir, image_folder, out, **args)
    assert "2 of 3 chunks encoded by this run" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in done} == done  # chunk 0 was not redone
    keys = all_keys(out)
    assert len(keys) == len(set(keys)) == 12 and summary["encoded"] == 12
    assert not [p for p in out.rglob("*") if sh.TMP_MARK in p.name]
    assert main(["verify", str(out)]) == 0
    # Once complete, the same command again changes nothing.
    manifest = (out / "manifest.json").read_text()
    assert run(codec_dir, image_folder, out, "--shard-size", "4") == 0
    assert "0 of 3 chunks encoded by this run" in capsys.readouterr().out
    assert (out / "manifest.json").read_text() == manifest


def test_rerun_with_other_settings_codec_or_inputs_is_refused(
    codec_dir, image_folder, tmp_path, capsys
):
    out = tmp_path / "lat"
    assert run(codec_dir, image_folder, out, "--resolution", "16") == 0
    assert run(codec_dir, image_folder, out, "--resolution", "16", "--store", "sample") == 2
    assert "store: 'mean' -> 'sample'" in capsys.readouterr().err
    other = Codec.from_pretrained(codec_dir, device="cpu")
    other.set_factors(0.25, 0.1)
    other.save_pretrained(tmp_path / "other")
    assert run(tmp_path / "other", image_folder, out, "--resolution", "16") == 2
    assert "codec scaling_factor: 0.5 -> 0.25" in capsys.readouterr().err
    Image.fromarray(smooth_image(50)).save(image_folder / "late.png")
    assert run(codec_dir, image_folder, out, "--resolution", "16") == 2
    err = capsys.readouterr().err
    assert "input files: 12 before, 13 now" in err and "choose a new --output" in err
    assert main(["verify", str(out)]) == 1  # and verify notices the new file
    assert "1 input(s) not in the latents, e.g. ['late.png']" in capsys.readouterr().out


def make_tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_webdataset_tars_are_keyed_by_member_name(codec_dir, image_folder, tmp_path):
    members = {}
    for p in sorted(image_folder.glob("img0[1-3].*")):
        members[f"{p.stem}.{p.suffix[1:]}"] = p.read_bytes()
        members[f"{p.stem}.json"] = b'{"caption": "x"}'  # webdataset side data: not an input
    members["broken.jpg"] = b"not a jpeg"
    make_tar(tmp_path / "train-000.tar", members)
    out = tmp_path / "lat"
    opts = ("--resolution", "16", "--latent-dtype", "fp32")
    assert run(codec_dir, tmp_path / "train-000.tar", out, *opts) == 0
    assert all_keys(out) == ["img01.jpg", "img02.png", "img03.jpg", "broken.jpg"]
    ds = LatentDataset(out)
    folder_out = tmp_path / "from_folder"
    assert run(codec_dir, image_folder, folder_out, *opts) == 0
    ref = {it["key"]: it["latents"] for it in LatentDataset(folder_out)}
    for it in ds:  # the bytes read from the tar are the files' bytes
        assert torch.equal(it["latents"], ref[it["key"]])
    # A folder holding tars (the webdataset layout): keys are tar path + member name.
    shards = tmp_path / "wds"
    (shards / "part").mkdir(parents=True)
    shutil.copy(tmp_path / "train-000.tar", shards / "part")
    assert [i.key for i in inputs.list_inputs(shards)][:2] == [
        "part/train-000.tar/broken.jpg", "part/train-000.tar/img01.jpg"]
    (shards / "more.tar.gz").write_bytes(b"")
    with pytest.raises(ValueError, match="decompress it"):
        inputs.list_inputs(shards)


def test_sample_is_reproducible_and_mean_std_feeds_fresh_samples(codec_dir, image_folder, tmp_path):
    common = ("--resolution", "16", "--latent-dtype", "fp32")

    def latents(name, *extra):
        assert run(codec_dir, image_folder, tmp_path / name, *common, *extra) == 0
        return {it["key"]: it for it in LatentDataset(tmp_path / name, sample=False)}

    mean = latents("mean")
    a = latents("a", "--store", "sample", "--seed", "3", "--batch-size", "2")
    b = latents("b", "--store", "sample", "--seed", "3", "--batch-size", "5", "--shard-size", "7")
    c = latents("c", "--store", "sample", "--seed", "4")
    ms = latents("ms", "--store", "mean_std")
    for key in mean:
        # independent of batching and chunking:
        assert torch.allclose(a[key]["latents"], b[key]["latents"], atol=1e-6)
        assert not torch.allclose(a[key]["latents"], c[key]["latents"])
        assert torch.allclose(ms[key]["mean"], mean[key]["latents"], atol=1e-6)
        assert (ms[key]["std"] > 0).all()
    key = "img01.jpg"
    rng = np.random.default_rng([3, sorted(mean).index(key)])
    noise = torch.from_numpy(rng.standard_normal((4, 2, 2), dtype=np.float32))
    assert torch.allclose(a[key]["latents"], ms[key]["mean"] + ms[key]["std"] * noise, atol=1e-5)
    fresh = LatentDataset(tmp_path / "ms")
    assert not torch.equal(fresh[0]["latents"], fresh[0]["latents"])


def test_decompress_decodes_every_row_with_the_manifest_codec(
    codec_dir, image_folder, tmp_path, capsys
):
    out, recon = tmp_path / "lat", tmp_path / "recon"
    assert run(codec_dir, image_folder, out, "--resolution", "16", "--latent-dtype", "bf16") == 0
    shard = sh.load_manifest(out)["shards"][0]["file"]
    with safe_open(str(out / shard), "pt") as f:
        assert f.get_slice("latents").get_dtype() == "BF16"
    assert main(["decompress", str(out), str(recon)]) == 0
    files = sorted(p.relative_to(recon).as_posix() for p in recon.rglob("*.png"))
    assert len(files) == 12 and "sub/img00.png" in files and "img01.png" in files
    codec = Codec.from_pretrained(codec_dir, device="cpu")
    item = next(it for it in LatentDataset(out) if it["key"] == "img01.jpg")
    expected = codec.decode(item["latents"][None], output_type="pil")[0]
    assert np.array_equal(np.asarray(Image.open(recon / "img01.png")), np.asarray(expected))
    # A look at a few: --limit N first rows, --keys those inputs; an unknown key is named.
    assert main(["decompress", str(out), str(tmp_path / "few"), "--limit", "3"]) == 0
    assert len(list((tmp_path / "few").rglob("*.png"))) == 3
    assert main(["decompress", str(out), str(tmp_path / "two"), "--keys", "img01.jpg", "sub/img00.png"]) == 0
    assert sorted(p.relative_to(tmp_path / "two").as_posix() for p in (tmp_path / "two").rglob("*.png")) == [
        "img01.png", "sub/img00.png"]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "two" / "img01.png")), np.asarray(expected))
    capsys.readouterr()
    assert main(["decompress", str(out), str(tmp_path / "none"), "--keys", "nope.jpg"]) == 2
    assert "no latents for the key(s) ['nope.jpg']" in capsys.readouterr().err
    other = Codec(build_autoencoder("test"), device="cpu")
    other.save_pretrained(tmp_path / "other")
    capsys.readouterr()
    wrong = ["decompress", str(out), str(tmp_path / "r2"), "--codec", str(tmp_path / "other")]
    assert main(wrong) == 2
    err = capsys.readouterr().err
    assert "not in the latent space of" in err and "encoder weights" in err and str(codec_dir) in err
    assert not (tmp_path / "r2").exists()  # refused before decoding anything
    assert main([*wrong, "--force"]) == 0  # the rare intended case, said out loud
    assert "decoding anyway (--force)" in capsys.readouterr().err
    # A manifest edited to another codec's hash: the recorded codec is refused too.
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["codec"]["latent_space"]["encoder_sha256"] = "0" * 64
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert main(["decompress", str(out), str(tmp_path / "r3")]) == 2
    assert "encoder weights 000000000000 vs" in capsys.readouterr().err
    manifest["codec"]["latent_space"] = {"scaling_factor": "x"}  # malformed
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert main(["decompress", str(out), str(tmp_path / "r3")]) == 2
    assert "malformed latent_space" in capsys.readouterr().err


def test_scale_measures_and_writes_the_factors(codec_dir, image_folder, tmp_path, capsys):
    target = tmp_path / "codec"
    shutil.copytree(codec_dir, target)
    assert main(["scale", "--codec", str(target), "--input", str(image_folder),
                 "--resolution", "16",
                 "--shift", "--num-workers", "0"]) == 0
    assert re.search(r"scaling_factor 0\.50000 -> \d\.\d+, shift_factor", capsys.readouterr().out)
    stats = json.loads((target / "vae_codec.json").read_text())["latent_stats"]
    config = json.loads((target / "config.json").read_text())
    assert stats["num_images"] == 12
    assert config["scaling_factor"] == pytest.approx(1 / stats["std"])
    assert config["shift_factor"] == pytest.approx(stats["mean"])
    codec = Codec.from_pretrained(target, device="cpu")
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    ref = Codec.from_pretrained(codec_dir, device="cpu").posterior(x)[0]  # weights unchanged
    assert torch.allclose(codec.encode(x), (ref - stats["mean"]) / stats["std"], atol=1e-5)
    assert not list(tmp_path.glob(f"*{sh.TMP_MARK}*"))


def test_real_photos_native_size(codec_dir, tmp_path):
    kodak = shared("kodak")
    src = tmp_path / "kodak"
    src.mkdir()
    for name in ("kodim01.png", "kodim04.png"):  # one landscape, one portrait
        shutil.copy(kodak / name, src / name)
    out = tmp_path / "lat"
    assert run(codec_dir, src, out) == 0
    shapes = sh.load_manifest(out)["summary"]["latent_shapes"]
    assert shapes == {"4x64x96": 1, "4x96x64": 1}
    assert main(["verify", str(out), "--input", str(src)]) == 0


def test_codec_modules_do_not_import_accelerate_at_import_time():
    for path in (REPO / "codec").glob("*.py"):
        lines = path.read_text().splitlines()
        top_level = [line for line in lines if re.match(r"(import|from) accelerate", line)]
        assert not top_level, f"{path.name} imports accelerate at module level"
    from codec.launch import distributed_state

    assert distributed_state() is None  # one process: accelerate is never touched


@pytest.mark.slow
def test_sigkill_mid_job_then_rerun_completes(codec_dir, tmp_path):
    src, out = tmp_path / "src", tmp_path / "lat"
    src.mkdir()
    for i in range(60):
        Image.fromarray(smooth_image(i, 32, 32)).save(src / f"{i:03d}.png")
    cmd = [sys.executable, "-m", "codec.compress", "--codec", str(codec_dir), "--input", str(src),
           "--output", str(out), "--shard-size", "2", "--num-workers", "0", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        while proc.poll() is None and len(list((out / "parts").glob("*.json"))) < 2:
            time.sleep(0.01)
        proc.kill()  # SIGKILL: no cleanup of any kind, possibly in the middle of a write
    finally:
        proc.wait(timeout=60)
    done = len(list((out / "parts").glob("*.json")))
    assert proc.returncode == -9, proc.stderr.read().decode()[-2000:]  # killed, not finished
    assert 2 <= done < 30 and not (out / "manifest.json").exists()
    assert run(codec_dir, src, out, "--shard-size", "2") == 0
    keys = all_keys(out)
    assert len(keys) == len(set(keys)) == 60
    assert main(["verify", str(out)]) == 0


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["--multi_gpu", "--cpu"])  # --cpu: our relaunch (codec/launch.py)
def test_accelerate_launch_two_processes(codec_dir, image_folder, tmp_path, mode):
    out = tmp_path / "lat"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", mode, "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "codec.compress", "--codec", str(codec_dir), "--input", str(image_folder),
        "--output", str(out), "--resolution", "16", "--shard-size", "3", "--num-workers", "0",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "12 inputs = 12 encoded + 0 skipped" in proc.stdout and "(2 process(es))" in proc.stdout
    ranks = sorted(json.loads(p.read_text())["rank"] for p in (out / "parts").glob("*.json"))
    assert ranks == [0, 0, 1, 1]
    assert main(["verify", str(out)]) == 0
    single = tmp_path / "single"
    if mode == "--multi_gpu":
        assert run(codec_dir, image_folder, single, "--resolution", "16", "--shard-size", "3") == 0
        ref = {it["key"]: it["latents"] for it in LatentDataset(single)}
        for it in LatentDataset(out):
            assert torch.allclose(it["latents"], ref[it["key"]], atol=1e-3)
        return
    # One process with the threads each of the two had (torch.distributed.run gives each one): the
    # same bytes, shard by shard and in the manifest. (CPU kernels round by thread count, as GPU
    # kernels by GPU model: the count of processes itself changes nothing.)
    cmd = [sys.executable, "-m", "codec.compress", *cmd[cmd.index("--codec"):]]
    cmd[cmd.index("--output") + 1] = str(single)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(p.relative_to(single) for p in single.rglob("*.*")
                   if p.parent.name == "shards" or p.name == "manifest.json")
    assert len(files) == 5  # 4 shards and the manifest
    for f in files:
        assert sha256_file(single / f) == sha256_file(out / f), f


def test_identical_runs_write_byte_identical_shards_and_manifests(codec_dir, image_folder, tmp_path):
    import hashlib

    for name in ("a", "b"):
        assert run(codec_dir, image_folder, tmp_path / name, "--resolution", "16", "--shard-size", "5") == 0
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.*")
                   if p.parent.name == "shards" or p.name == "manifest.json")
    assert len(files) == 4  # 3 shards and the manifest
    for f in files:  # (the safetensors writer orders metadata keys at random: sorted now)
        digest = [hashlib.sha256((tmp_path / d / f).read_bytes()).hexdigest() for d in ("a", "b")]
        assert digest[0] == digest[1], f


def test_odd_directory_entries_are_encoded_or_listed_never_lost(codec_dir, tmp_path):
    """An animated GIF is its first frame; broken and looping symbolic links named like images
    are listed as skipped with the reason; `verify` accounts for every entry."""
    src = tmp_path / "odd"
    src.mkdir()
    frames = [Image.fromarray(smooth_image(i, 40, 48)) for i in range(3)]
    frames[0].save(src / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    Image.fromarray(smooth_image(9, 40, 48)).save(src / "plain.png")
    (src / "loop_a.jpg").symlink_to(src / "loop_b.jpg")
    (src / "loop_b.jpg").symlink_to(src / "loop_a.jpg")
    (src / "gone.png").symlink_to(src / "missing.png")
    (src / "folder.jpg").mkdir()  # a directory named like an image is not an input
    out = tmp_path / "lat"
    assert run(codec_dir, src, out) == 0
    manifest = sh.load_manifest(out)
    skipped = {s["key"]: s["reason"] for s in manifest["skipped"]}
    assert sorted(skipped) == ["gone.png", "loop_a.jpg", "loop_b.jpg"]
    assert "symbolic links" in skipped["loop_a.jpg"] and "No such file" in skipped["gone.png"]
    assert sorted(all_keys(out)) == ["anim.gif", "gone.png", "loop_a.jpg", "loop_b.jpg", "plain.png"]
    assert main(["verify", str(out), "--input", str(src)]) == 0
    with Image.open(src / "anim.gif") as gif:  # what was encoded is frame 0, not a later one
        decoded = []
        for i in range(2):
            gif.seek(i)
            decoded.append(np.asarray(gif.convert("RGB")))
    ours = np.asarray(load_image(src / "anim.gif"))
    assert np.array_equal(ours, decoded[0]) and not np.array_equal(ours, decoded[1])


@pytest.mark.parametrize("store", ["mean", "mean_std"])
def test_flip_stores_the_mirrored_image_latents_and_the_dataset_picks_one(codec_dir, image_folder, tmp_path, store):
    out = tmp_path / "lat"
    assert run(codec_dir, image_folder, out, "--resolution", "32", "--store", store, "--flip") == 0
    assert main(["verify", str(out)]) == 0
    ds = LatentDataset(out, sample=False)
    codec = Codec.from_pretrained(codec_dir, device="cpu")
    key = ds.get(0)["key"]
    x, _, _ = inputs.fit(load_image(image_folder / key), 32)
    x = x[None].float() / 127.5 - 1
    plain, mirrored = ds.get(0, flipped=False), ds.get(0, flipped=True)
    assert plain["flipped"] is False and mirrored["flipped"] is True
    torch.testing.assert_close(plain["latents"], codec.encode(x)[0], atol=2e-2, rtol=0)  # fp16 storage
    torch.testing.assert_close(mirrored["latents"], codec.encode(x.flip(-1))[0], atol=2e-2, rtol=0)
    # The latent of the mirrored image is not the mirrored latent: flips must be encoded, not flipped.
    assert (mirrored["latents"] - plain["latents"].flip(-1)).abs().max() > 0.05
    torch.manual_seed(0)
    views = [ds[0]["flipped"] for _ in range(40)]
    assert 5 < sum(views) < 35  # both views, about half each
    assert not any(LatentDataset(out, sample=False, flip=False)[0]["flipped"] for _ in range(10))
    # A rerun into the same folder without --flip is another job: refused with the difference named.
    assert run(codec_dir, image_folder, out, "--resolution", "32", "--store", store) == 2


def test_latents_without_flip_refuse_a_flipped_view(codec_dir, image_folder, tmp_path):
    out = tmp_path / "lat"
    assert run(codec_dir, image_folder, out, "--resolution", "32") == 0
    ds = LatentDataset(out)
    assert "flipped" not in ds[0]
    with pytest.raises(ValueError, match="compress with --flip"):
        ds.get(0, flipped=True)
