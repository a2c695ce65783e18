"""``report.html``: one self-contained page comparing codecs (no external files or scripts).

Takes the report dict that ``metrics.json`` holds and the pictures of
:func:`codec.evaluate.evaluate` (already ``data:`` URIs), and lays out: the quality table
(best value per column in bold), cost, latent statistics with histograms, the worst images
side by side with error heat-maps, and every per-image number.
"""

from __future__ import annotations

import math
from html import escape

from codec.evaluation.metrics import IMAGE_METRICS, LOWER_IS_BETTER

TITLES = {"psnr": "PSNR (dB) ↑", "ssim": "SSIM ↑", "ms_ssim": "MS-SSIM ↑",
          "lpips_alex": "LPIPS AlexNet ↓", "lpips_vgg": "LPIPS VGG ↓"}

CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; background: #fff; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 28px; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; vertical-align: top; }
th { background: #f2f4f7; } td.name, th.name { text-align: left; }
.best { font-weight: bold; background: #e6f4e6; }
.notice { background: #fff6d6; border: 1px solid #e8d48a; padding: 6px 10px; margin: 4px 0; }
.meta { color: #555; }
.crops { display: flex; flex-wrap: wrap; gap: 6px; } /* wraps instead of scrolling sideways */
.crops figure { margin: 0; text-align: center; } .crops img { image-rendering: pixelated; }
.ramp { display: inline-block; width: 160px; height: 12px; vertical-align: middle;
        background: linear-gradient(to right, #000004, #57106e, #bc3754, #f98e09, #fcffa4); }
"""


def _num(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:.{digits}f}"


def _mean_std(s: dict, digits: int = 4) -> str:
    if s["n"] == 0:
        return "–"
    return f"{_num(s['mean'], digits)} ± {_num(s['std'], digits)}"


def _best(report: dict, key: str) -> str | None:
    vals = {n: r["metrics"][key]["mean"] for n, r in report["codecs"].items()
            if r["metrics"][key]["n"] > 0}
    if not vals:
        return None
    pick = min if key in LOWER_IS_BETTER else max
    return pick(vals, key=vals.get)


def _quality(report: dict) -> str:
    best = {k: _best(report, k) for k in IMAGE_METRICS}
    head = "".join(f"<th>{escape(TITLES[k])}</th>" for k in IMAGE_METRICS)
    rows = []
    for name, r in report["codecs"].items():
        cells = "".join(
            f"<td class='{'best' if best[k] == name else ''}'>{_mean_std(r['metrics'][k])}</td>"
            for k in IMAGE_METRICS)
        rows.append(f"<tr><td class='name'>{escape(name)}</td><td class='name'>{escape(r['kind'])}</td>"
                    f"<td>{_mean_std(r['bpp'], 3)}</td>{cells}<td>{_num(r.get('rfid'), 2)}</td>"
                    f"<td>{_kid(r.get('kid'))}</td></tr>")
    n = next((r.get("rfid_images") for r in report["codecs"].values() if r.get("rfid_images")), None)
    on = f" on {n} images" if n else ""
    return (f"<table><tr><th class='name'>codec</th><th class='name'>kind</th><th>bits/pixel</th>"
            f"{head}<th>rFID ↓</th><th>KID ×10³ ↓</th></tr>{''.join(rows)}</table>"
            f"<p class='meta'>Protocol: {escape(report.get('protocol', 'full resolution'))}. Mean ± standard "
            "deviation over images. Learned codecs: bits/pixel of their latents stored as fp16; JPEG and WebP: "
            "file size at the Pillow quality closest to the first codec's rate, chosen per image. rFID and KID"
            f"{on}, with the Inception-v3 of published rFID (pool features, 2048-d).</p>")


def _kid(kid: dict | None) -> str:
    if not kid:
        return "–"
    std = f" ± {1e3 * kid['std']:.2f}" if kid.get("std") is not None else ""
    return f"{1e3 * kid['mean']:.2f}{std}"


def _activations(activations: dict | None, fallbacks: int | None) -> str:
    """The cost table's activation cells: each half's largest magnitude, and whether fp16 holds it."""
    if not activations:
        return "<td>–</td><td>–</td>"
    over = [half for half, bad in activations["fp16_overflows"].items() if bad]
    verdict = f"overflows ({', '.join(over)})" if over else "fits"
    if fallbacks:
        verdict += f"; {fallbacks} batch(es) redone in fp32"
    return (f"<td>{activations['encoder_max_abs']:.3g} / {activations['decoder_max_abs']:.3g}</td>"
            f"<td class='{'bad' if over else ''}'>{escape(verdict)}</td>")


def _cost(report: dict) -> str:
    rows, methods = [], set()
    for name, r in report["codecs"].items():
        c = r["cost"]
        methods.add(c["peak_memory_method"])
        rows.append(
            f"<tr><td class='name'>{escape(name)}</td><td class='name'>{escape(c['device'])}</td>"
            f"<td>{_num(c['parameters'])}</td><td>{_num(c['encode_images_per_s'], 2)}</td>"
            f"<td>{_num(c['decode_images_per_s'], 2)}</td><td>{_num(c['encode_megapixels_per_s'], 2)}</td>"
            f"<td>{_num(c['decode_megapixels_per_s'], 2)}</td><td>{_num(c['peak_memory_mib'], 1)}</td>"
            f"{_activations(c.get('activations'), c.get('precision_fallbacks'))}</tr>")
    return ("<table><tr><th class='name'>codec</th><th class='name'>device</th><th>parameters</th>"
            "<th>encode img/s</th><th>decode img/s</th><th>encode MP/s</th><th>decode MP/s</th>"
            "<th>peak memory (MiB)</th><th>max |activation| encoder / decoder</th><th>fp16</th>"
            f"</tr>{''.join(rows)}</table>"
            f"<p class='meta'>Machine: {escape(report['machine'])}. One image at a time at full "
            "resolution; the first image is a warm-up and not timed. Peak memory: "
            f"{escape('; '.join(sorted(methods)))}, above what was in use before each call.</p>")


def _latents(report: dict, histograms: dict) -> str:
    parts = []
    for name, r in report["codecs"].items():
        lat = r["latents"]
        if lat is None:
            continue
        means = ", ".join(f"{v:+.3f}" for v in lat["channel_mean"])
        stds = ", ".join(f"{v:.3f}" for v in lat["channel_std"])
        kl = "– (no posterior)" if lat["kl_per_element"] is None else f"{lat['kl_per_element']:.4f} nats"
        parts.append(
            f"<h3>{escape(name)}</h3><table>"
            f"<tr><td class='name'>scaling / shift factor</td><td>{lat['scaling_factor']:.5f} / "
            f"{lat['shift_factor']:.5f}</td></tr>"
            f"<tr><td class='name'>per-channel mean</td><td>{means}</td></tr>"
            f"<tr><td class='name'>per-channel std</td><td>{stds}</td></tr>"
            f"<tr><td class='name'>KL to N(0, I) per latent element</td><td>{kl}</td></tr>"
            f"{_space_rows(lat.get('space'))}{_alignment_rows(lat.get('alignment'))}</table>")
        if name in histograms:
            parts.append(f"<img alt='latent histogram of {escape(name)}' src='{histograms[name]}'>")
    if not parts:
        return ""
    return ("<h2>Latent statistics</h2><p class='meta'>Scaled latents (posterior mean), as a "
            "diffusion model would see them: close to mean 0 and std 1 is what diffusion "
            "schedules assume.</p>" + "".join(parts))


def _space_rows(space: dict | None) -> str:
    """Latent-space measures (codec.equivariance) as table rows."""
    if not space:
        return ""
    rows = [f"<tr><td class='name'>spectral energy above {space['high_frequency_cutoff']:g} × Nyquist</td>"
            f"<td>{_num(space['high_frequency_share'])}</td></tr>"]
    for name, t in space["transforms"].items():
        rows.append(f"<tr><td class='name'>{escape(name)}: equivariance error / PSNR of D(τ E(x))</td>"
                    f"<td>{_num(t['latent_error'])} / {_num(t['decoded_psnr'], 2)} dB</td></tr>")
    return "".join(rows)


def _alignment_rows(alignment: dict | None) -> str:
    """VA-VAE's alignment with a foundation model (codec.alignment) as table rows."""
    if not alignment:
        return ""
    model = escape(str(alignment["model"]))
    return (f"<tr><td class='name'>alignment with {model}: cosine term / distance term (margins "
            f"{alignment['cos_margin']:g} / {alignment['distance_margin']:g})</td>"
            f"<td>{_num(alignment['cosine_term'])} / {_num(alignment['distance_term'])}</td></tr>"
            f"<tr><td class='name'>alignment with {model}: mean cosine / mean |Δ cos| of position pairs "
            f"({alignment['images']} images, projection fitted per image)</td>"
            f"<td>{_num(alignment['mean_cosine'])} / {_num(alignment['mean_distance_error'])}</td></tr>")


def _figure(src: str, caption: str, size: int) -> str:
    return f"<figure><img width='{size}' src='{src}'><figcaption>{escape(caption)}</figcaption></figure>"


def _worst(report: dict, worst: list[dict]) -> str:
    if not worst:
        return ""
    pics = report["pictures"]
    size = 2 * pics["crop"]
    blocks = []
    for w in worst:
        figures = [_figure(w["original"], "original", size)]
        for c in w["codecs"]:
            figures += [_figure(c["recon"], f"{c['codec']}: {c['psnr']:.2f} dB", size),
                        _figure(c["error"], f"{c['codec']}: error", size)]
        top, left, side = w["window"]
        blocks.append(
            f"<h3>{escape(w['file'])}</h3><p class='meta'>crop {side}×{side} px at (x {left}, y "
            f"{top}), shown 2×</p><img height='{size}' src='{w['thumb']}'>"
            f"<div class='crops'>{''.join(figures)}</div>")
    return (f"<h2>Worst {len(worst)} images by {escape(pics['worst_by'])}</h2>"
            "<p class='meta'>The crop is where the first codec's error is largest. Error heat-map: "
            f"mean absolute RGB error, <span class='ramp'></span> 0 to {pics['heatmap_max']:g} "
            "(of full scale), the same scale for every codec.</p>" + "".join(blocks))


def _per_image(report: dict, rows: list[dict]) -> str:
    names = list(report["codecs"])
    files = list(dict.fromkeys(r["file"] for r in rows))
    table = {(r["file"], r["codec"]): r for r in rows}
    head = "".join(f"<th>{escape(n)}<br>PSNR / LPIPS-vgg</th>" for n in names)
    body = "".join(
        f"<tr><td class='name'>{escape(f)}</td>" + "".join(
            f"<td>{_num(table[(f, n)]['psnr'], 2)} / {_num(table[(f, n)]['lpips_vgg'], 3)}</td>"
            for n in names) + "</tr>" for f in files)
    return ("<h2>Per image</h2><details><summary>every image (also in per_image.csv)</summary>"
            f"<table><tr><th class='name'>file</th>{head}</tr>{body}</table></details>")


def render(report: dict, pictures: dict, rows: list[dict]) -> str:
    """The whole page as one HTML string."""
    notices = "".join(f"<div class='notice'>{escape(n)}</div>" for n in report["notices"])
    skipped = ""
    if report["skipped"]:
        items = "".join(f"<li>{escape(s)}</li>" for s in report["skipped"])
        skipped = f"<details><summary>{len(report['skipped'])} file(s) skipped</summary><ul>{items}</ul></details>"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Codec evaluation: {escape(report['data'])}</title>
<style>{CSS}</style></head><body>
<h1>Codec evaluation</h1>
<p class="meta">{report['images']} images from {escape(report['data'])} · {escape(report['created'])}</p>
{notices}{skipped}
<h2>Quality</h2>{_quality(report)}
<h2>Cost</h2>{_cost(report)}
{_latents(report, pictures['histograms'])}
{_worst(report, pictures['worst'])}
{_per_image(report, rows)}
</body></html>
"""
