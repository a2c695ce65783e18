"""The main job, end to end and offline: ``make demo`` (or ``python -m scripts.demo``).

Trains the ``tiny`` kl-f8 codec for a few minutes on colour photographs that ship inside
scikit-image (no download), evaluates it on photos it did not train on, exports it as a
diffusers folder, and writes a reconstruction grid and a metrics file under ``runs/demo/``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# Colour photos bundled inside the scikit-image wheel (skimage/data/), copied as files so the
# demo exercises the same image loader users get. (Its greyscale photos are left out: they
# teach a young codec to drop colour.)
TRAIN_IMAGES = ["astronaut.png", "hubble_deep_field.jpg", "ihc.png", "retina.jpg", "rocket.jpg",
                "motorcycle_left.png", "motorcycle_right.png"]
EVAL_IMAGES = ["chelsea.png", "coffee.png"]  # held out: a cat and a cup, never trained on


def write_skimage_photos(names: list[str], folder: Path) -> list[Path]:
    import skimage.data

    source = Path(skimage.data.__file__).parent
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(source / name, folder / name)
    return [folder / name for name in names]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(REPO / "runs" / "demo"))
    parser.add_argument("--steps", type=int, default=600, help="training steps (600: ~3 min on 2 cores)")
    args = parser.parse_args(argv)

    from codec import Codec
    from codec.cli import main as cli
    from codec.images import center_crop_multiple, load_image, make_grid_image, pil_to_tensor
    from train.autoencoder.config import load_config
    from train.autoencoder.loop import train

    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)  # the demo always starts fresh
    train_dir = write_skimage_photos(TRAIN_IMAGES, out / "data" / "train")[0].parent
    eval_files = write_skimage_photos(EVAL_IMAGES, out / "data" / "eval")

    cfg = load_config(REPO / "configs" / "tiny.yaml", [
        f"output_dir={out / 'run'}", f"data.train={train_dir}", f"data.val={eval_files[0].parent}",
        f"max_steps={args.steps}", "checkpoint_every=200", "val_every=200", "image_every=200",
        "data.val_crop=256", "data.val_images=2", "optim.warmup_steps=50",
        "batch_size=6",  # 7 training photos: one full batch per epoch
    ])
    train(cfg)

    export = out / "export"
    cli(["export", str(out / "run"), str(export)])
    cli(["eval", "--codec", str(export), "--data", str(eval_files[0].parent), "--out", str(out / "eval")])

    codec = Codec.from_pretrained(export, device="cpu")
    originals = [center_crop_multiple(pil_to_tensor(load_image(p))[None])[..., :256, :256] for p in eval_files]
    x = torch.cat(originals)
    grid = make_grid_image([x, codec.reconstruct(x)], out / "reconstructions.png")
    report = json.loads((out / "eval" / "metrics.json").read_text())
    metrics = report["codecs"][report["primary"]]["metrics"]
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print("\n".join([
        "", "demo finished:",
        f"  codec (diffusers folder)   {export}",
        f"  reconstruction grid        {grid}   (top: originals, bottom: reconstructions)",
        f"  evaluation report          {out / 'eval' / 'report.html'}   (vs JPEG / WebP at the same bpp)",
        f"  metrics                    {out / 'metrics.json'}   "
        + ", ".join(f"{k} {v['mean']:.3f}" for k, v in metrics.items()),
        f"  training run / tensorboard {out / 'run'}",
    ]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
