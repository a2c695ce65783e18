"""``vae-codec eval``: compare codecs the way codec engineers do.

For one or more learned codecs (``--codec``, repeatable: ours or any diffusers AutoencoderKL /
AutoencoderTiny folder) plus JPEG and WebP at the latents' rate, on an image folder at full
resolution, writes to ``--out``:

* ``metrics.json``: per codec, mean/std of PSNR, SSIM, MS-SSIM, LPIPS (AlexNet, VGG), bits per
  pixel, rFID (when Inception can be loaded), latent statistics, latent-space measures
  (equivariance error under ``transforms`` and the high-frequency share of the latents'
  spectrum, :mod:`codec.equivariance`; with ``vf_model``, the alignment of the latents with a
  vision foundation model, VA-VAE's two terms, :mod:`codec.alignment`) and cost;
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
from tqdm.auto import tqdm

from codec.alignment import AlignmentMeasures
from codec.equivariance import DEFAULT_TRANSFORMS, LatentMeasures, check_transforms
from codec.evaluation.activations import FP16_MAX
from codec.evaluation.activations import merged as merged_activations
from codec.evaluation.cost import PeakMemory
from codec.evaluation.fid import FID_RELIABLE_FROM, make_rfid
from codec.evaluation.figures import (
    HEATMAP_MAX,
    crop,
    data_uri,
    error_heatmap,
    grid,
    histogram,
    thumbnail_with_box,
    worst_window,
)
from codec.evaluation.metrics import IMAGE_METRICS, MS_SSIM_MIN_SIDE, LatentStats, LPIPSMetric, image_metrics, summarize
from codec.evaluation.references import CLASSICAL_FORMATS, ClassicalCodec, LearnedCodec
from codec.images import ImageLoadError, center_crop_multiple, pil_to_tensor, tensor_to_uint8
from codec.launch import Shares
from codec.memory import parse_memory
from codec.sources import Input, list_source, read_input


# ------------------------------------------------------------------------- the evaluation
def check_protocol(protocol: int | None) -> None:
    if protocol is not None and (protocol < 8 or protocol % 8):
        raise ValueError(f"--protocol must be 'full' or a side in pixels that is a multiple of 8 (256 is the "
                         f"published one), got {protocol}")


def describe_protocol(protocol: int | None) -> str:
    if protocol is None:
        return "full resolution (sides centre-cropped to multiples of 8)"
    return (f"{protocol}: short side resized to {protocol} (torchvision Resize, bilinear, antialiased), "
            f"centre crop {protocol}x{protocol}, as published rFID tables")


def _load(item: Input, protocol: int | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
    """(1, 3, H, W) as evaluated (``protocol``: resized and centre-cropped to that square, as the
    published tables do; else centre-cropped to multiples of 8), and the size as stored."""
    image = read_input(item)
    stored = (image.height, image.width)
    if protocol is not None:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        image = TF.center_crop(TF.resize(image, protocol, InterpolationMode.BILINEAR, antialias=True), protocol)
    return center_crop_multiple(pil_to_tensor(image)[None]), stored


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
             classical: bool = True, transforms: list[str] | None = DEFAULT_TRANSFORMS,
             image_column: str = "image", split: str = "train", streaming: bool = False,
             max_memory: int | str | None = None, protocol: int | None = None, vf_model: str | None = None) -> dict:
    """Evaluate ``codecs`` (+ JPEG/WebP) on ``data``; write everything to ``out``; return the
    report (what ``metrics.json`` holds). ``transforms``: those of the equivariance measures
    (empty or None: no latent-space measures). ``protocol``: None for full resolution, or the
    side of the published protocol's square (256). ``vf_model``: a foundation model
    (:func:`codec.foundation.load_foundation`) to measure the latents' alignment with, or None."""
    if worst < 0 or crop_size < 8:
        raise ValueError(f"--worst must be >= 0 and --crop >= 8, got {worst} and {crop_size}")
    check_protocol(protocol)
    check_transforms(transforms or [], where="--transforms")
    shares = Shares()  # several processes (torchrun, accelerate launch, --num-processes): images split
    if shares.state is not None and torch.cuda.is_available() and device in (None, "cuda"):
        device = str(shares.state.device)  # one GPU per process
    skipped: list[str] = []
    problems: list[dict] = []  # shards of a stream that could not be read to their end
    files = list_source(data, image_column, split, streaming, limit=limit or None, problems=problems)
    skipped += [p["reason"] for p in problems]
    out = Path(out)
    learned = [LearnedCodec(p, device=device, dtype=dtype, max_memory=max_memory) for p in codecs]
    names = _labels([str(p) for p in codecs])
    dev = learned[0].device
    budget = parse_memory(max_memory)
    foundation = None
    if vf_model:
        from codec.foundation import load_foundation

        foundation = load_foundation(vf_model, where="--vf-model").to(dev)
    lpips = {"alex": LPIPSMetric("alex", dev, budget), "vgg": LPIPSMetric("vgg", dev, budget)}
    notices = []
    checked = []
    for i in shares.mine(len(files)):  # first pass: which files load (and their sizes), before any codec runs
        try:
            x, stored = _load(files[i], protocol)
        except ImageLoadError as exc:
            checked.append((i, None, str(exc)))
            continue
        checked.append((i, tuple(x.shape[-2:]), protocol is None and stored != tuple(x.shape[-2:])))
    checked = sorted(c for piece in shares.gather(checked) for c in piece)
    skipped += [reason for _, size, reason in checked if size is None]
    good = [(files[i], size) for i, size, _ in checked if size is not None]
    cropped = sum(bool(was_cropped) for _, size, was_cropped in checked if size is not None)
    if not good:
        raise ValueError(f"no readable images in {data} ({len(skipped)} skipped)")
    rfid = None
    if len(good) < 2:
        notices.append(f"rFID and KID need at least 2 images, there is {len(good)}; left out (the other "
                       "metrics are kept)")
    else:
        rfid, rfid_notice = make_rfid(dev)
        notices += [rfid_notice] if rfid_notice else []
        if rfid is not None and len(good) < FID_RELIABLE_FROM:
            notices.append(f"rFID rests on {len(good)} images: under {FID_RELIABLE_FROM} FID is biased upward "
                           "and not comparable with published values (those use 50 000); KID is unbiased")
    if cropped:
        notices.append(f"{cropped} image(s) centre-cropped to multiples of 8 px "
                       "(every codec sees the same crop)")
    small = sum(min(s) < MS_SSIM_MIN_SIDE for _, s in good)
    if small:
        notices.append(f"MS-SSIM left out for {small} image(s) under {MS_SSIM_MIN_SIDE} px on a side "
                       "(5 scales of an 11-px window do not fit); its mean uses the others")
    if shares.world > 1:
        notices.append(f"evaluated by {shares.world} processes (cost figures are per process)")

    subjects = list(zip(names, learned))
    results, hists, crops, rows = {}, {}, {}, []
    windows: dict[int, tuple] = {}
    picks: list[int] = []  # the worst images of the first codec, by PSNR
    i = 0
    while i < len(subjects):  # grows: the classical references join after the first codec
        name, subject = subjects[i]
        piece = _run_subject(subject, good, shares.mine(len(good)), lpips, rfid, crop_size,
                             None if i == 0 else {j: windows[j] for j in picks}, transforms, protocol,
                             progress=shares.is_main, foundation=foundation)
        res = _combine(subject, shares.gather(piece), rfid)
        results[name] = res["summary"]
        notices += _overflow_notice(name, res["summary"]["cost"]["activations"])
        notices += _alignment_notice(name, res["summary"]["latents"])
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

    report = {
        "data": str(data), "images": len(good), "skipped": skipped, "notices": notices,
        "protocol": describe_protocol(protocol),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(dev), "primary": names[0],
        "pictures": {"worst_by": f"PSNR of {names[0]}", "crop": crop_size,
                     "heatmap_max": HEATMAP_MAX},
        "codecs": results,
    }
    if not shares.is_main:
        return report
    out.mkdir(parents=True, exist_ok=True)
    pictures = _pictures(out, report, good, picks, windows, crops, hists, rows, protocol)
    (out / "metrics.json").write_text(json.dumps(_json_safe(report), indent=2))
    _write_csv(out / "per_image.csv", rows)
    from codec.evaluation.report import render

    (out / "report.html").write_text(render(report, pictures, rows), encoding="utf-8")
    return report


def _run_subject(subject, good, mine, lpips, rfid, crop_size, windows, transforms=None, protocol=None,
                 progress=True, foundation=None) -> dict:
    """One codec over this process's images (``mine``: indices into ``good``): metrics per image,
    latent statistics, Inception features, timings, crops. :func:`_combine` joins the pieces of
    every process.

    ``windows`` is None for the first codec (it finds the worst window of every image, and its
    crops are kept as (original, reconstruction) pairs); later codecs get the picked windows
    and keep only their reconstruction crops there.
    """
    piece = {"rows": [], "crops": {}, "found": {}, "real": [], "fake": [], "enc_s": 0.0, "dec_s": 0.0,
             "timed": 0, "pixels": 0,
             "stats": LatentStats() if subject.learned else None,
             "space": LatentMeasures(transforms) if subject.learned and transforms else None,
             "alignment": AlignmentMeasures(foundation) if subject.learned and foundation is not None else None}
    take_real = rfid is not None and rfid.real is None
    memory = PeakMemory(subject.device)
    for k, j in enumerate(tqdm(mine, desc=f"eval {subject.path[-40:]}", unit="img", disable=not progress)):
        path, (h, w) = good[j]
        x, _ = _load(path, protocol)
        with memory:
            rec = subject(x)
        if k > 0 or len(mine) == 1:  # the first call pays one-off set-up costs: a warm-up
            piece["enc_s"] += rec.encode_s
            piece["dec_s"] += rec.decode_s
            piece["timed"] += 1
            piece["pixels"] += h * w
        m = image_metrics(x, rec.image, lpips["alex"], lpips["vgg"])
        if piece["stats"] is not None:
            piece["stats"].update(rec.latents, rec.mean, rec.logvar)
        if piece["space"] is not None:
            piece["space"].update(subject.encode_latents, subject.decode_latents, x, rec.latents)
        if piece["alignment"] is not None:  # the unscaled posterior mean where there is one (the VF loss's z)
            piece["alignment"].update(x, rec.mean if rec.mean is not None else rec.latents)
        if rfid is not None:
            if take_real:
                piece["real"].append((j, rfid.features(x)))
            piece["fake"].append((j, rfid.features(rec.image)))
        xa, ya = tensor_to_uint8(x)[0], tensor_to_uint8(rec.image)[0]
        if windows is None:
            piece["found"][j] = worst_window(xa, ya, crop_size)
            piece["crops"][j] = (crop(xa, piece["found"][j]), crop(ya, piece["found"][j]))
        elif j in windows:
            piece["crops"][j] = crop(ya, windows[j])
        piece["rows"].append((j, {"file": str(path), "width": w, "height": h, "bpp": rec.bpp,
                                  **{k: v[0] for k, v in m.items()}, "quality": rec.extra.get("quality", "")}))
    piece["peak"], piece["method"] = memory.peak_bytes, memory.method
    if subject.learned:
        piece["activations"] = subject.activations.result()
        piece["fallbacks"] = subject.codec.fallbacks
    return piece


def _overflow_notice(name: str, activations: dict | None) -> list[str]:
    """Say where a codec's activations pass fp16's range (what --dtype fp16 would turn into inf)."""
    if not activations:
        return []
    over = [f"{half} {activations[f'{half}_max_abs']:.3g}"
            for half, bad in activations["fp16_overflows"].items() if bad]
    if not over:
        return []
    return [f"{name}: activations reach {', '.join(over)}, beyond fp16's {FP16_MAX:.0f}: --dtype fp16 recomputes "
            "such batches in float32 (use bf16, or fp32)"]


def _alignment_notice(name: str, latents: dict | None) -> list[str]:
    """Say how many images the alignment measures left out (sides not multiples of 16)."""
    alignment = (latents or {}).get("alignment")
    if not alignment or not alignment["left_out"]:
        return []
    return [f"{name}: alignment with {alignment['model']} measured on {alignment['images']} image(s); "
            f"{alignment['left_out']} left out, their sides not multiples of 16 px (one token per 16 px; "
            "--protocol 256 gives every image a whole grid)"]


def _merged(accumulators):
    """One LatentStats / LatentMeasures / AlignmentMeasures holding what every process's saw (None if none kept any)."""
    kept = [a for a in accumulators if a is not None]
    for other in kept[1:]:
        kept[0].merge(other)
    return kept[0] if kept else None


def _combine(subject, pieces: list[dict], rfid) -> dict:
    """The pieces of every process (one alone) -> this codec's summary, rows in image order,
    crops, windows and histogram values."""
    rows = [row for _, row in sorted((r for p in pieces for r in p["rows"]), key=lambda r: r[0])]
    ordered = lambda key: torch.cat([f for _, f in sorted((f for p in pieces for f in p[key]),  # noqa: E731
                                                            key=lambda f: f[0])])
    fid = {"rfid": None, "kid": None, "images": None}
    if rfid is not None:
        if rfid.real is None:
            rfid.real = ordered("real")
        fid = rfid.score(ordered("fake"))
    stats, space = _merged(p["stats"] for p in pieces), _merged(p["space"] for p in pieces)
    alignment = _merged(p["alignment"] for p in pieces)
    enc_s, dec_s = sum(p["enc_s"] for p in pieces), sum(p["dec_s"] for p in pieces)
    timed, pixels = sum(p["timed"] for p in pieces), sum(p["pixels"] for p in pieces)
    latents = None
    if stats is not None:
        latents = {**stats.result(), "scaling_factor": subject.scaling_factor,
                   "shift_factor": subject.shift_factor,
                   "posterior": "mean" if subject.kind == "AutoencoderKL" else "deterministic",
                   "space": space.result() if space is not None else None,
                   "alignment": alignment.result() if alignment is not None else None}
    summary = {
        "path": subject.path, "kind": subject.kind, "learned": subject.learned,
        "bpp": summarize([r["bpp"] for r in rows]),
        "metrics": {k: summarize([r[k] for r in rows]) for k in IMAGE_METRICS},
        "rfid": fid["rfid"], "kid": fid["kid"], "rfid_images": fid["images"],
        "latents": latents,
        "cost": {
            "parameters": subject.parameters, "device": str(subject.device),
            "encode_images_per_s": timed / enc_s if enc_s > 0 else None,
            "decode_images_per_s": timed / dec_s if dec_s > 0 else None,
            "encode_megapixels_per_s": pixels / 1e6 / enc_s if enc_s > 0 else None,
            "decode_megapixels_per_s": pixels / 1e6 / dec_s if dec_s > 0 else None,
            "timed_images": timed,
            "peak_memory_mib": max(p["peak"] for p in pieces) / 2**20,
            "peak_memory_method": pieces[0]["method"],
            "activations": merged_activations([p["activations"] for p in pieces]) if subject.learned else None,
            "precision_fallbacks": sum(p["fallbacks"] for p in pieces) if subject.learned else None,
        },
    }
    return {"summary": summary, "rows": rows,
            "crops": {j: c for p in pieces for j, c in p["crops"].items()},
            "windows": {j: w for p in pieces for j, w in p["found"].items()},
            "hist": stats.histogram_values() if stats is not None else None}


# ------------------------------------------------------------------------- outputs
def _pictures(out, report, good, picks, windows, crops, hists, rows, protocol=None) -> dict:
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
        thumb = thumbnail_with_box(tensor_to_uint8(_load(path, protocol)[0])[0], windows[j], 2 * crop_size)
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
    head = ["codec", "bpp", "PSNR", "SSIM", "MS-SSIM", "LPIPS-a", "LPIPS-v", "rFID", "KIDx1e3", "enc img/s",
            "dec img/s"]
    lines = []
    for name, r in report["codecs"].items():
        m, c, kid = r["metrics"], r["cost"], r.get("kid")
        cells = [name, f"{r['bpp']['mean']:.3f}"] + [f"{m[k]['mean']:.4f}" for k in IMAGE_METRICS] + [
            "-" if r.get("rfid") is None else f"{r['rfid']:.3f}", "-" if not kid else f"{1e3 * kid['mean']:.3f}"] + [
            "-" if c[k] is None else f"{c[k]:.2f}" for k in ("encode_images_per_s", "decode_images_per_s")]
        lines.append(cells)
    table = _fixed_width(head, lines)
    spaces = {name: r["latents"]["space"] for name, r in report["codecs"].items()
              if r.get("latents") and r["latents"].get("space")}
    if not spaces:
        return table + _alignment_table(report)
    names = list(next(iter(spaces.values()))["transforms"])
    head = ["codec", "HF share"] + [f"eq err {t}" for t in names] + [f"PSNR {t}" for t in names]
    cell = lambda v, digits: "-" if v is None else f"{v:.{digits}f}"  # noqa: E731
    lines = [[name, cell(sp["high_frequency_share"], 4)]
             + [cell(sp["transforms"][t]["latent_error"], 4) for t in names]
             + [cell(sp["transforms"][t]["decoded_psnr"], 2) for t in names] for name, sp in spaces.items()]
    table += "\n\nlatent space (codec.equivariance):\n" + _fixed_width(head, lines)
    return table + _alignment_table(report)


def _alignment_table(report: dict) -> str:
    """VA-VAE's alignment terms per codec (empty without --vf-model)."""
    aligned = {name: r["latents"]["alignment"] for name, r in report["codecs"].items()
               if r.get("latents") and r["latents"].get("alignment")}
    if not aligned:
        return ""
    cell = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    head = ["codec", "cosine term", "distance term", "mean cos", "mean |d cos|", "images"]
    lines = [[name, cell(a["cosine_term"]), cell(a["distance_term"]), cell(a["mean_cosine"]),
              cell(a["mean_distance_error"]), str(a["images"])] for name, a in aligned.items()]
    model = next(iter(aligned.values()))["model"]
    return f"\n\nalignment with {model} (codec.alignment; lower terms: more aligned):\n" + _fixed_width(head, lines)


def _fixed_width(head: list[str], lines: list[list[str]]) -> str:
    width = [max(len(x) for x in col) for col in zip(head, *lines)]
    fmt = lambda row: "  ".join(x.ljust(w) for x, w in zip(row, width))  # noqa: E731
    return "\n".join([fmt(head)] + [fmt(r) for r in lines])
