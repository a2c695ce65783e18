"""Untrusted files: codecs, shards, manifests and latents are never unpickled, malformed ones
fail naming the file, and the image loader and shard reader are fuzzed (hypothesis)."""

import io
import json
import pickle

import numpy as np
import pytest
import torch
from conftest import smooth_image
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from test_shards import build

from codec import Codec
from codec.cli import main
from codec.images import ImageLoadError, load_image
from codec.latents import shards as sh
from codec.models import CodecLoadError, build_autoencoder

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture
def codec_dir(tmp_path):
    torch.manual_seed(0)
    return Codec(build_autoencoder("test"), device="cpu").save_pretrained(tmp_path / "codec")


class _Bomb:
    """Unpickling this creates a marker file: proof that pickled code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pickled_codec_is_refused_and_never_unpickled(codec_dir, tmp_path):
    marker = tmp_path / "PWNED"
    (codec_dir / "diffusion_pytorch_model.safetensors").unlink()
    with open(codec_dir / "diffusion_pytorch_model.bin", "wb") as fh:
        pickle.dump({"x": _Bomb(marker)}, fh)
    with pytest.raises(CodecLoadError, match="safetensors"):
        Codec.from_pretrained(codec_dir)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["diffusion_pytorch_model.safetensors", "config.json", "vae_codec.json"])
def test_malformed_codec_files_give_an_error_naming_the_file(codec_dir, name):
    path = codec_dir / name
    # cut short: a safetensors header that runs past the file, or JSON that stops mid-object
    path.write_bytes(path.read_bytes()[:50] if name.endswith(".safetensors") else b'{"scaling_factor": ')
    with pytest.raises(ValueError, match=name):
        Codec.from_pretrained(codec_dir)
    assert main(["decode", "--codec", str(codec_dir), "--device", "cpu", "x.safetensors", "y.png"]) == 2


def test_malformed_latents_file_is_a_clear_cli_error(codec_dir, tmp_path, capsys):
    bad = tmp_path / "photo.latents.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    assert main(["decode", "--codec", str(codec_dir), "--device", "cpu", str(bad), str(tmp_path / "o.png")]) == 2
    assert "photo.latents.safetensors: not a readable latents file" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["not json", "no shards", "wrong types"])
def test_malformed_manifest_gives_an_error_naming_it(tmp_path, damage):
    build(tmp_path)
    path = tmp_path / sh.MANIFEST_FILE
    manifest = json.loads(path.read_text())
    if damage == "not json":
        path.write_text(path.read_text()[:-20])
    elif damage == "no shards":
        del manifest["shards"]
        path.write_text(json.dumps(manifest))
    else:
        manifest["codec"] = [1, 2]
        path.write_text(json.dumps(manifest))
    with pytest.raises(sh.ShardError, match="manifest.json"):
        sh.load_manifest(tmp_path)


def test_a_shard_that_is_not_one_gives_an_error_naming_it(tmp_path):
    _, manifest, _ = build(tmp_path)
    shard = tmp_path / manifest["shards"][0]["file"]
    shard.write_bytes(b"PK\x03\x04 a zip, or a pickle, but not safetensors")
    with pytest.raises(sh.ShardError, match=shard.name):
        sh.read_shard_entry(shard)


# ------------------------------------------------------------------------- fuzzing
def _encoded(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(smooth_image(0, 16, 24)).save(buf, format=fmt)
    return buf.getvalue()


SEEDS = {fmt: _encoded(fmt) for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")}


@st.composite
def mutated(draw, seeds):
    """A valid file with a few bytes flipped, cut short, or with bytes inserted."""
    data = bytearray(draw(st.sampled_from(sorted(seeds.values()))))
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "cut":
            data = data[:pos]
        else:
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


@FUZZ
@given(data=st.one_of(mutated(SEEDS), st.binary(max_size=256)))
def test_fuzzed_images_only_raise_image_load_error(data):
    try:
        img = load_image(io.BytesIO(data), name="fuzz")
    except ImageLoadError as exc:
        assert "fuzz" in str(exc)
    else:
        assert img.mode == "RGB" and np.asarray(img).ndim == 3


@pytest.fixture(scope="module")
def shard_bytes(tmp_path_factory):
    out = tmp_path_factory.mktemp("shard")
    _, manifest, _ = build(out)
    return (out / manifest["shards"][0]["file"]).read_bytes()


@FUZZ
@given(data=st.data())
def test_fuzzed_shards_only_raise_shard_error(tmp_path, shard_bytes, data):
    blob = data.draw(st.one_of(mutated({"shard": shard_bytes}), st.binary(max_size=128)))
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(blob)
    try:
        job, entry = sh.read_shard_entry(path)
    except sh.ShardError as exc:
        assert "fuzz.safetensors" in str(exc)
    else:
        assert isinstance(job, dict) and entry["rows"] == len(entry["keys"])
