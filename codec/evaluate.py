"""``vae-codec eval``: reconstruction metrics of a codec on an image folder.

Writes ``metrics.json`` (mean and std per metric) and ``per_image.csv``; unreadable images are
skipped and listed in ``metrics.json``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from .codec import Codec
from .images import ImageLoadError, center_crop_multiple, list_images, load_image, pil_to_tensor


def register(sub, codec_args) -> None:
    p = sub.add_parser("eval", help="reconstruction metrics on an image folder")
    codec_args(p)
    p.add_argument("--data", required=True, help="image folder or file list")
    p.add_argument("--out", required=True, help="folder for metrics.json and per_image.csv")
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N images")
    p.set_defaults(func=cmd_eval)


def _codec(args) -> Codec:
    return Codec.from_pretrained(args.codec, device=args.device, dtype=args.dtype, batch_size=args.batch_size)


def cmd_eval(args) -> int:
    from .metrics import LPIPSMetric, evaluate_pairs, summarize

    codec = _codec(args)
    files = list_images(args.data)
    if args.limit:
        files = files[: args.limit]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lpips_alex = LPIPSMetric("alex", codec.device)
    rows, skipped = [], []
    for path in files:
        try:
            x = center_crop_multiple(pil_to_tensor(load_image(path))[None])
        except ImageLoadError as exc:
            skipped.append(str(exc))
            continue
        y = codec.reconstruct(x)
        m = evaluate_pairs([(x, y)], lpips_alex)
        rows.append({"file": str(path), **{("lpips_alex" if k == "lpips" else k): v[0] for k, v in m.items()}})
    if not rows:
        raise ValueError(f"no readable images in {args.data}")
    keys = [k for k in rows[0] if k != "file"]
    metrics = {k: summarize([r[k] for r in rows]) for k in keys}
    report = {"codec": str(args.codec), "data": str(args.data), "images": len(rows),
              "skipped": skipped, "metrics": metrics}
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    with open(out / "per_image.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["file", *keys])
        writer.writeheader()
        writer.writerows(rows)
    summary = ", ".join(f"{k} {v['mean']:.4f} ± {v['std']:.4f}" for k, v in metrics.items())
    print(f"{len(rows)} images: {summary}; written to {out}")
    return 0


