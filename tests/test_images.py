import io

import numpy as np
import pytest
import torch
from conftest import smooth_image
from PIL import Image

from codec.images import ImageLoadError, list_images, load_image, tensor_to_uint8, to_batch, uint8_to_tensor


def save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return path


def test_modes_become_rgb(tmp_path):
    rgb = Image.fromarray(smooth_image(1))
    cases = {
        "grey.png": rgb.convert("L"),
        "palette.png": rgb.convert("P"),
        "cmyk.jpg": rgb.convert("CMYK"),
        "rgba.png": rgb.convert("RGBA"),
        "bw.png": rgb.convert("1"),
    }
    for name, img in cases.items():
        out = load_image(save(img, tmp_path / name))
        assert out.mode == "RGB" and out.size == rgb.size, name


def test_alpha_composited_on_white(tmp_path):
    arr = np.zeros((8, 8, 4), np.uint8)  # fully transparent black
    out = np.asarray(load_image(save(Image.fromarray(arr, "RGBA"), tmp_path / "t.png")))
    assert (out == 255).all()


def test_16bit_rescaled_not_clipped(tmp_path):
    arr = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    out = np.asarray(load_image(save(Image.fromarray(arr), tmp_path / "g16.png")))
    assert out.min() == 0 and out.max() == 255
    assert 100 < out.mean() < 155  # a linear ramp stays a ramp, not a white image


def test_exif_orientation_applied(tmp_path):
    img = Image.fromarray(smooth_image(2, 40, 64))  # landscape pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    out = load_image(save(img, tmp_path / "rot.jpg", exif=exif))
    assert out.size == (40, 64)  # shown as portrait


@pytest.mark.parametrize("content", [b"", b"this is text, not a jpeg", None])
def test_bad_files_raise_image_load_error(tmp_path, content):
    path = tmp_path / "bad.jpg"
    if content is None:  # truncated real JPEG
        buf = io.BytesIO()
        Image.fromarray(smooth_image(3, 64, 64)).save(buf, "JPEG")
        content = buf.getvalue()[:200]
    path.write_bytes(content)
    with pytest.raises(ImageLoadError, match="bad.jpg"):
        load_image(path)


def test_animated_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    out = np.asarray(load_image(tmp_path / "a.gif"))
    assert out[..., 0].mean() > 200 and out[..., 1].mean() < 50


def test_list_images_recursive_and_file_list(image_folder, tmp_path):
    files = list_images(image_folder)
    assert len(files) == 12 and any(f.parent.name == "sub" for f in files)
    listing = tmp_path / "list.txt"
    listing.write_text(f"# two files\n{files[0]}\n\n{files[1].relative_to(tmp_path)}\n")
    assert list_images(listing) == [files[0], files[1]]
    with pytest.raises(FileNotFoundError):
        list_images(tmp_path / "missing")


def test_to_batch_inputs_agree():
    arr = smooth_image(4, 16, 24)
    from_pil = to_batch(Image.fromarray(arr))
    from_np = to_batch(arr)
    from_list = to_batch([arr, arr])
    assert from_pil.shape == (1, 3, 16, 24) and torch.equal(from_pil, from_np)
    assert from_list.shape == (2, 3, 16, 24)
    assert np.array_equal(tensor_to_uint8(uint8_to_tensor(arr)[None])[0], arr)  # exact round trip


def test_to_batch_rejects_wrong_inputs():
    with pytest.raises(ValueError, match=r"\[-1, 1\].*127.5"):
        to_batch(torch.full((1, 3, 8, 8), 200.0))
    with pytest.raises(TypeError, match="uint8"):
        to_batch(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="share a size"):
        to_batch([smooth_image(0, 8, 8), smooth_image(0, 16, 8)])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        to_batch(torch.zeros(1, 4, 8, 8))


@pytest.mark.parametrize("scale", [1.0, 255.0])
def test_float_tiffs_are_read_by_their_range(tmp_path, scale):
    """A float image in [0, 1] is not 8-bit data: 0.2..0.6 must come out near 51..153, not 0..1."""
    values = np.linspace(0.2, 0.6, 64 * 48, dtype=np.float32).reshape(48, 64) * scale
    Image.fromarray(values, mode="F").save(tmp_path / "float.tif")
    grey = np.asarray(load_image(tmp_path / "float.tif"))[..., 0].astype(int)
    assert abs(grey.min() - 51) <= 1 and abs(grey.max() - 153) <= 1


def test_grids_carry_labels_where_asked_and_nothing_elsewhere(tmp_path):
    import numpy as np
    import torch
    from PIL import Image

    from codec.images import make_grid_image

    torch.manual_seed(0)
    rows = [torch.rand(3, 3, 48, 64) * 2 - 1, torch.rand(3, 3, 48, 64) * 2 - 1]
    plain = np.asarray(Image.open(make_grid_image(rows, tmp_path / "plain.png")))
    labelled = np.asarray(Image.open(make_grid_image(rows, tmp_path / "l.png", [["cat", None], [None, "31.2 dB"]])))
    differs = (plain != labelled).any(-1)
    cell = lambda r, c: differs[2 + r * 50: 2 + r * 50 + 48, 2 + c * 66: 2 + c * 66 + 64]  # noqa: E731
    assert cell(0, 0)[:14].any() and cell(1, 1)[:14].any()  # the text, on its band at the top of the cell
    assert not cell(0, 1).any() and not cell(1, 0).any() and not cell(0, 2).any()  # unlabelled cells untouched
    assert not cell(0, 0)[20:].any()  # below the band the picture is unchanged


def test_greyscale_tensors_are_rgb_images_with_equal_channels():
    import torch

    from codec.images import to_batch

    grey = torch.rand(2, 1, 8, 8) * 2 - 1
    assert torch.equal(to_batch(grey), grey.expand(-1, 3, -1, -1))
