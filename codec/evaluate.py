"""``vae-codec eval``: compare codecs the way codec engineers do.

For one or more learned codecs (``--codec``, repeatable: ours or any diffusers AutoencoderKL /
AutoencoderTiny folder) plus JPEG and WebP at the latents' rate, on an image folder at full
resolution, writes to ``--out``:

* ``metrics.json``: per codec, mean/std of PSNR, SSIM, MS-SSIM, LPIPS (AlexNet, VGG), bits per
  pixel, rFID (when Inception can be loaded), latent statistics and cost;
* ``per_image.csv``: one row per (image, codec);
* ``comparison.png`` (worst images of the first codec, crops side by side) and
  ``latents_*.png`` (latent histograms);
* ``report.html``: all of it in one self-contained page (images embedded as data URIs).

Images whose sides are not multiples of 8 are centre-cropped to the nearest multiple (every
codec sees the same pixels); unreadable files are skipped and listed.
"""

from __future__ import annotations

import csv
import json
import math
import platform
from datetime import datetime, timezone
from pathlib import Path

import torch

from .array_data import is_array_source
from .cost import PeakMemory
from .fid import make_rfid
from .images import ImageLoadError, center_crop_multiple, list_images, load_image, pil_to_tensor, tensor_to_uint8
from .metrics import IMAGE_METRICS, MS_SSIM_MIN_SIDE, LatentStats, LPIPSMetric, image_metrics, summarize
from .pictures import HEATMAP_MAX, crop, data_uri, error_heatmap, grid, histogram, thumbnail_with_box, worst_window
from .references import CLASSICAL_FORMATS, ClassicalCodec, LearnedCodec


def register(sub, codec_args) -> None:
    """Add ``eval`` to the CLI. ``codec_args`` (the shared --codec/--device/... options) is not
    used: here ``--codec`` repeats, and one image at a time makes --batch-size meaningless."""
    p = sub.add_parser("eval", help="metrics, pictures and an HTML report for one or more codecs")
    p.add_argument("--codec", action="append", required=True,
                   help="codec folder (ours, any diffusers AutoencoderKL or AutoencoderTiny); repeat "
                        "to compare; the first one picks the worst images and the reference rate")
    p.add_argument("--data", required=True,
                   help="image folder or file list; for MLP VAE codecs also an .npz / idx folder (test split)")
    p.add_argument("--out", required=True, help="folder for metrics.json, per_image.csv, report.html")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N images")
    p.add_argument("--worst", type=int, default=4, help="how many worst images (by PSNR) to show")
    p.add_argument("--crop", type=int, default=128, help="side of the picture crops, in pixels")
    p.add_argument("--no-classical", action="store_true", help="leave out the JPEG and WebP references")
    # The vanilla VAE baseline (MLPVAE codecs) is evaluated as in the VAE literature (vae_eval).
    p.add_argument("--nll-samples", type=int, default=None,
                   help="MLP VAE codecs: importance samples k for log p(x) (Burda et al. use 5000; 0: ELBO only)")
    p.add_argument("--binarize", default=None, choices=["auto", "yes", "no"],
                   help="MLP VAE codecs: binarise the test set once (auto: when the model trained on binarised data)")
    p.add_argument("--seed", type=int, default=None,
                   help="MLP VAE codecs (default 0): seed of the binarisation and samples")
    p.set_defaults(func=cmd_eval)


def _is_mlp_vae(path: str) -> bool:
    cfg = Path(path) / "config.json"
    return cfg.exists() and json.loads(cfg.read_text()).get("_class_name") == "MLPVAE"


def cmd_eval(args) -> int:
    if any(_is_mlp_vae(c) for c in args.codec) or is_array_source(args.data):
        from .vae_eval import evaluate_vae, summary

        if len(args.codec) != 1:
            raise ValueError("MLP VAE evaluation takes one --codec")
        report = evaluate_vae(args.codec[0], args.data, args.out,
                              nll_samples=5000 if args.nll_samples is None else args.nll_samples,
                              limit=args.limit, binarize_mode=args.binarize or "auto", seed=args.seed or 0,
                              device=args.device)
        print(summary(report))
        print(f"written to {args.out}/metrics.json (+ samples.png, interpolation.png, reconstructions.png)")
        return 0
    if args.nll_samples is not None or args.binarize is not None or args.seed is not None:
        raise ValueError("--nll-samples, --binarize and --seed apply to MLP VAE codecs only "
                         "(kl-f8 codecs have no tractable log p(x) here)")
    report = evaluate(args.codec, args.data, args.out, device=args.device, dtype=args.dtype,
                      limit=args.limit, worst=args.worst, crop_size=args.crop,
                      classical=not args.no_classical)
    print(summary_table(report))
    for notice in report["notices"]:
        print(f"note: {notice}")
    print(f"{report['images']} images; written to {args.out}/report.html (+ metrics.json, per_image.csv)")
    return 0


# ------------------------------------------------------------------------- the evaluation
def _load(path: Path) -> tuple[torch.Tensor, tuple[int, int]]:
    """(1, 3, H, W) centre-cropped to multiples of 8, and the size as stored."""
    x = pil_to_tensor(load_image(path))[None]
    return center_crop_multiple(x), tuple(x.shape[-2:])


def _labels(paths: list[str]) -> list[str]:
    """Display names: the paths as given, de-duplicated (the same folder twice stays apart)."""
    seen: dict[str, int] = {}
    out = []
    for p in paths:
        seen[p] = seen.get(p, 0) + 1
        out.append(p if seen[p] == 1 else f"{p} #{seen[p]}")
    return out


def evaluate(codecs: list[str], data: str, out: str, device: str | None = None,
             dtype: str = "fp32", limit: int = 0, worst: int = 4, crop_size: int = 128,
             classical: bool = True) -> dict:
    """Evaluate ``codecs`` (+ JPEG/WebP) on ``data``; write everything to ``out``; return the
    report (what ``metrics.json`` holds)."""
    if worst < 0 or crop_size < 8:
        raise ValueError(f"--worst must be >= 0 and --crop >= 8, got {worst} and {crop_size}")
    files = list_images(data)[: limit or None]
    out = Path(out)
    learned = [LearnedCodec(p, device=device, dtype=dtype) for p in codecs]
    names = _labels([str(p) for p in codecs])
    dev = learned[0].device
    lpips = {"alex": LPIPSMetric("alex", dev), "vgg": LPIPSMetric("vgg", dev)}
    rfid, rfid_notice = make_rfid(dev)
    notices = [rfid_notice] if rfid_notice else []

    good, skipped, cropped = [], [], 0
    for path in files:  # first pass: which files load (and their sizes), before any codec runs
        try:
            x, stored = _load(path)
        except ImageLoadError as exc:
            skipped.append(str(exc))
            continue
        good.append((path, tuple(x.shape[-2:])))
        cropped += stored != tuple(x.shape[-2:])
    if not good:
        raise ValueError(f"no readable images in {data} ({len(skipped)} skipped)")
    if cropped:
        notices.append(f"{cropped} image(s) centre-cropped to multiples of 8 px "
                       "(every codec sees the same crop)")
    small = sum(min(s) < MS_SSIM_MIN_SIDE for _, s in good)
    if small:
        notices.append(f"MS-SSIM left out for {small} image(s) under {MS_SSIM_MIN_SIDE} px on a side "
                       "(5 scales of an 11-px window do not fit); its mean uses the others")

    subjects = list(zip(names, learned))
    results, hists, crops, rows = {}, {}, {}, []
    windows: dict[int, tuple] = {}
    picks: list[int] = []  # the worst images of the first codec, by PSNR
    i = 0
    while i < len(subjects):  # grows: the classical references join after the first codec
        name, subject = subjects[i]
        res = _run_subject(subject, good, lpips, rfid, crop_size,
                           None if i == 0 else {j: windows[j] for j in picks})
        results[name] = res["summary"]
        rows += [{"codec": name, **r} for r in res["rows"]]
        if res["hist"] is not None:
            hists[name] = res["hist"]
        if i == 0:
            windows = res["windows"]
            picks = sorted(range(len(good)), key=lambda j: res["rows"][j]["psnr"])[:worst]
            crops[name] = {j: res["crops"][j] for j in picks}
            if classical:
                rate = results[name]["bpp"]["mean"]
                subjects += [(fmt, ClassicalCodec(fmt, rate)) for fmt in CLASSICAL_FORMATS]
        else:
            crops[name] = res["crops"]
        i += 1

    if rfid is not None and len(good) < 2:
        notices.append("rFID needs at least 2 images; left out")
    report = {
        "data": str(data), "images": len(good), "skipped": skipped, "notices": notices,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(dev), "primary": names[0],
        "pictures": {"worst_by": f"PSNR of {names[0]}", "crop": crop_size,
                     "heatmap_max": HEATMAP_MAX},
        "codecs": results,
    }
    out.mkdir(parents=True, exist_ok=True)
    pictures = _pictures(out, report, good, picks, windows, crops, hists, rows)
    (out / "metrics.json").write_text(json.dumps(_json_safe(report), indent=2))
    _write_csv(out / "per_image.csv", rows)
    from .report import render

    (out / "report.html").write_text(render(report, pictures, rows), encoding="utf-8")
    return report


def _run_subject(subject, good, lpips, rfid, crop_size, windows) -> dict:
    """One codec over every image: metrics per image, latent statistics, cost, crops.

    ``windows`` is None for the first codec (it finds the worst window of every image, and its
    crops are kept as (original, reconstruction) pairs); later codecs get the picked windows
    and keep only their reconstruction crops there.
    """
    rows, crops, found = [], {}, {}
    stats = LatentStats() if subject.learned else None
    memory = PeakMemory(subject.device)
    enc_s = dec_s = 0.0
    timed = pixels = 0
    bpps = []
    for j, (path, (h, w)) in enumerate(good):
        x, _ = _load(path)
        with memory:
            rec = subject(x)
        if j > 0 or len(good) == 1:  # the first call pays one-off set-up costs: a warm-up
            enc_s, dec_s = enc_s + rec.encode_s, dec_s + rec.decode_s
            timed, pixels = timed + 1, pixels + h * w
        m = image_metrics(x, rec.image, lpips["alex"], lpips["vgg"])
        if stats is not None:
            stats.update(rec.latents, rec.mean, rec.logvar)
        if rfid is not None:
            if not rfid.real_done:
                rfid.add_real(x)
            rfid.add_fake(rec.image)
        xa, ya = tensor_to_uint8(x)[0], tensor_to_uint8(rec.image)[0]
        if windows is None:
            found[j] = worst_window(xa, ya, crop_size)
            crops[j] = (crop(xa, found[j]), crop(ya, found[j]))
        elif j in windows:
            crops[j] = crop(ya, windows[j])
        bpps.append(rec.bpp)
        rows.append({"file": str(path), "width": w, "height": h, "bpp": rec.bpp,
                     **{k: v[0] for k, v in m.items()}, "quality": rec.extra.get("quality", "")})
    fid = rfid.compute_and_reset() if rfid is not None and len(good) >= 2 else None
    latents = None
    if stats is not None:
        latents = {**stats.result(), "scaling_factor": subject.scaling_factor,
                   "shift_factor": subject.shift_factor,
                   "posterior": "mean" if subject.kind == "AutoencoderKL" else "deterministic"}
    summary = {
        "path": subject.path, "kind": subject.kind, "learned": subject.learned,
        "bpp": summarize(bpps),
        "metrics": {k: summarize([r[k] for r in rows]) for k in IMAGE_METRICS},
        "rfid": fid,
        "latents": latents,
        "cost": {
            "parameters": subject.parameters, "device": str(subject.device),
            "encode_images_per_s": timed / enc_s if enc_s > 0 else None,
            "decode_images_per_s": timed / dec_s if dec_s > 0 else None,
            "encode_megapixels_per_s": pixels / 1e6 / enc_s if enc_s > 0 else None,
            "decode_megapixels_per_s": pixels / 1e6 / dec_s if dec_s > 0 else None,
            "timed_images": timed,
            "peak_memory_mib": memory.peak_bytes / 2**20,
            "peak_memory_method": memory.method,
        },
    }
    hist = stats.histogram_values() if stats is not None else None
    return {"summary": summary, "rows": rows, "crops": crops, "windows": found, "hist": hist}


# ------------------------------------------------------------------------- outputs
def _pictures(out, report, good, picks, windows, crops, hists, rows) -> dict:
    """Write comparison.png and latents_*.png; return the same pictures as data URIs."""
    names = list(report["codecs"])
    primary = report["primary"]
    psnr = {(r["file"], r["codec"]): r["psnr"] for r in rows}
    crop_size = report["pictures"]["crop"]
    histograms = {}
    for k, (name, values) in enumerate(hists.items()):
        img = histogram(values, f"{name}: scaled latents (bars) vs N(0, 1) (line)")
        img.save(out / f"latents_{k}.png")
        histograms[name] = data_uri(img)
    worst, grid_rows = [], []
    for j in picks:
        path = good[j][0]
        original, first = crops[primary][j]
        thumb = thumbnail_with_box(tensor_to_uint8(_load(path)[0])[0], windows[j], 2 * crop_size)
        cells = [{"codec": n, "psnr": psnr[(str(path), n)],
                  "recon": first if n == primary else crops[n][j]} for n in names]
        for c in cells:
            c["error"] = error_heatmap(original, c["recon"])
        grid_rows.append([thumb, original] + [a for c in cells for a in (c["recon"], c["error"])])
        worst.append({
            "file": str(path), "window": list(windows[j]), "thumb": data_uri(thumb, "JPEG"),
            "original": data_uri(original),
            "codecs": [{"codec": c["codec"], "psnr": c["psnr"], "recon": data_uri(c["recon"]),
                        "error": data_uri(c["error"])} for c in cells],
        })
    if grid_rows:
        header = ["image", "original"] + [t for n in names for t in (n, "error")]
        grid(grid_rows, header, cell=2 * crop_size).save(out / "comparison.png")
    return {"histograms": histograms, "worst": worst}


def _write_csv(path: Path, rows: list[dict]) -> None:
    fields = ["file", "codec", "width", "height", "bpp", *IMAGE_METRICS, "quality"]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for r in rows:  # NaN (MS-SSIM on a small image) is written as an empty cell
            writer.writerow({k: "" if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()})


def _json_safe(obj):
    """NaN -> null: JSON has no NaN, and strict parsers reject Python's ``NaN`` token."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        accel = torch.cuda.get_device_name(device)
    else:
        accel = f"CPU, {torch.get_num_threads()} threads"
    cpu = platform.processor() or platform.machine()
    return f"{platform.node()}: {cpu}, {accel}; torch {torch.__version__}"


def summary_table(report: dict) -> str:
    """The headline figures as a fixed-width text table (what the CLI prints)."""
    head = ["codec", "bpp", "PSNR", "SSIM", "MS-SSIM", "LPIPS-a", "LPIPS-v", "enc img/s", "dec img/s"]
    lines = []
    for name, r in report["codecs"].items():
        m, c = r["metrics"], r["cost"]
        cells = [name, f"{r['bpp']['mean']:.3f}"] + [f"{m[k]['mean']:.4f}" for k in IMAGE_METRICS] + [
            "-" if c[k] is None else f"{c[k]:.2f}" for k in ("encode_images_per_s", "decode_images_per_s")]
        lines.append(cells)
    width = [max(len(x) for x in col) for col in zip(head, *lines)]
    fmt = lambda row: "  ".join(x.ljust(w) for x, w in zip(row, width))  # noqa: E731
    return "\n".join([fmt(head)] + [fmt(r) for r in lines])
