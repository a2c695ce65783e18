"""codec.memory: a memory budget per encode/decode pass, chosen by the tool; images over it are
done in exact tiles (the untiled numbers), images too large even tiled are refused before any
work, and the budget's own settings are checked."""

import warnings

import pytest
import torch
from conftest import smooth_image
from PIL import Image

from codec import Codec
from codec.cli import main
from codec.images import pil_to_tensor, save_image
from codec.memory import MemoryBudgetError, choose_path, parse_memory, untiled_bytes
from codec.models import build_autoencoder


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return build_autoencoder("test").eval()


def test_sizes_parse_and_nonsense_is_refused():
    assert parse_memory("8G") == 8 * 2**30 and parse_memory("512MiB") == 512 * 2**20
    assert parse_memory("1.5g") == int(1.5 * 2**30) and parse_memory(1000) == 1000
    assert parse_memory(None) is None and parse_memory("auto") is None
    for bad in ("0", 0, "-1G", "lots", "8X", ""):
        with pytest.raises(ValueError, match="not a positive amount of memory"):
            parse_memory(bad)


def test_an_image_over_the_budget_is_decoded_in_exact_tiles_with_the_untiled_numbers(vae):
    x = pil_to_tensor(Image.fromarray(smooth_image(0, 512, 576)))[None]
    need = untiled_bytes(vae, "decode", 512 * 576, 1, torch.float32)
    whole = Codec(vae, device="cpu")
    z = whole.encode(x)
    budget = Codec(vae, device="cpu", max_memory=need * 3 // 4)  # the exact path fits, the untiled does not
    with pytest.warns(RuntimeWarning, match=r"decode of 576x512 images: an untiled pass would need .*exact tiles"):
        tiled = budget.decode(z)
    torch.testing.assert_close(tiled, whole.decode(z), rtol=1e-4, atol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per codec and direction
        budget.decode(z)
    torch.testing.assert_close(budget.encode(x), z, rtol=1e-4, atol=1e-4)


def test_an_image_too_large_even_tiled_is_refused_before_any_work(vae, tmp_path, capsys):
    with pytest.raises(MemoryBudgetError, match=r"decode of a 4096x4096 image needs about .* even in 256-px tiles"):
        choose_path(vae, "decode", (4096, 4096), 1, torch.float32, torch.device("cpu"), 2**20)
    codec = Codec(vae, device="cpu")
    folder = codec.save_pretrained(tmp_path / "codec")
    save_image(pil_to_tensor(Image.fromarray(smooth_image(1, 256, 256))), tmp_path / "in.png")
    assert main(["encode", "--codec", str(folder), "--max-memory", "100K", str(tmp_path / "in.png"),
                 str(tmp_path / "z.safetensors")]) == 2
    assert "even in" in capsys.readouterr().err and not (tmp_path / "z.safetensors").exists()
    assert main(["encode", "--codec", str(folder), "--max-memory", "0", str(tmp_path / "in.png"),
                 str(tmp_path / "z.safetensors")]) == 2
    assert "not a positive amount of memory" in capsys.readouterr().err


@pytest.mark.parametrize("h,w", [(1, 1), (1, 100_000)])
def test_degenerate_sizes_encode_and_decode(vae, h, w):
    x = torch.rand(1, 3, h, w) * 2 - 1
    codec = Codec(vae, device="cpu", max_memory="64M")  # the long strip goes over it: tiled
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        z = codec.encode(x, pad=True)
        y = codec.decode(z, size=(h, w))
    assert z.shape == (1, 4, 1, -(-w // 8)) and y.shape == (1, 3, h, w) and torch.isfinite(y).all()


def test_eval_records_a_truncated_jpeg_among_big_images_and_evaluates_the_others(vae, tmp_path):
    import json

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(smooth_image(i, 384, 512)).save(folder / f"big{i}.png")  # over the budget below
    Image.fromarray(smooth_image(5, 384, 512)).save(tmp_path / "whole.jpg")
    data = (tmp_path / "whole.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(data[: len(data) // 3])
    codec = Codec(vae, device="cpu").save_pretrained(tmp_path / "codec")
    out = tmp_path / "report"
    with pytest.warns(RuntimeWarning, match="memory budget: decode"):  # the big images were tiled
        assert main(["eval", "--codec", str(codec), "--data", str(folder), "--out", str(out), "--no-classical",
                     "--transforms", "none", "--worst", "1", "--max-memory", "40M"]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["images"] == 2 and len(report["skipped"]) == 1 and "cut.jpg" in report["skipped"][0]


def test_lpips_vgg_in_tiles_equals_the_whole_image_value():
    import lpips

    from codec.evaluation.lpips_tiles import tiled_lpips_vgg
    from codec.evaluation.metrics import LPIPSMetric

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torchvision's deprecated pretrained= inside lpips
        model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()
    x = torch.rand(1, 3, 150, 290) * 2 - 1  # 2 x 3 tiles, sides that are not multiples of the stride
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    with torch.no_grad():
        whole, tiled = model(x, y).flatten(), tiled_lpips_vgg(model, x, y, tile=128)
    torch.testing.assert_close(tiled, whole, rtol=1e-4, atol=0)
    metric = LPIPSMetric("vgg", max_memory=2**20)  # over this budget: the metric tiles
    metric._model = model
    assert metric._over_budget(x)
    torch.testing.assert_close(metric(x, y), whole, rtol=1e-4, atol=0)


def test_on_a_gpu_the_budget_is_the_free_device_memory(vae, monkeypatch):
    """CPU stand-in: torch.cuda.mem_get_info reports 100 MiB free; nothing runs on a device."""
    from codec import memory

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (100 * 2**20, 80 * 2**30))
    budget, host, how = memory.budgets(torch.device("cuda"), None)
    assert budget == int(100 * 2**20 * memory.DEVICE_SHARE) and "GPU" in how and host != budget
    side, method, notice = choose_path(vae, "decode", (2048, 2048), 1, torch.float32, torch.device("cuda"), None)
    assert side is not None and method == "exact" and "free GPU memory" in notice
    assert choose_path(vae, "decode", (256, 256), 1, torch.float32, torch.device("cuda"), None)[0] is None
