"""Which latent space latents live in: recorded beside every latent, checked before decoding.

Latents mean something only to the codec that made them: the same tensor decoded by a codec with
other encoder weights or other factors gives a wrong image, and nothing in the tensor says so. A
*latent space* is what decides the meaning:

* ``encoder_sha256``: a hash of the encoding side's weights (``encoder.*`` and ``quant_conv.*``;
  the decoder is left out, so a decoder-only fine-tune such as SD's ``ft-MSE`` VAE still decodes
  the original's latents, as it was made to);
* the factors that scaled them (``scaling_factor``, ``shift_factor``, ``latents_mean``/``std``);
* ``latent_channels`` (the flat size for the MLP VAE).

A distilled ``AutoencoderTiny`` student lives in its teacher's space (its encoder was trained to
give the teacher's scaled latents, its decoder to decode them), so its metadata carries the
teacher's space and teacher and student decode each other's latents. ``codec`` (where they were
made) is recorded for messages only.
"""

from __future__ import annotations

import hashlib
import json
import math

import torch

SPACE_KEY = "latent_space"  # safetensors metadata key of latents files; field of a manifest's codec
FACTORS = ("scaling_factor", "shift_factor", "latents_mean", "latents_std")
ENCODING_PARTS = ("encoder.", "quant_conv.", "to_posterior.")  # kl-f8 / AutoencoderTiny / MLP VAE


class LatentSpaceMismatch(ValueError):
    """Latents made in another latent space than the decoding codec's (the message names both)."""


def encoder_sha256(vae) -> str:
    """Fingerprint of the weights that make latents (names, dtypes and bytes, in fp32 order)."""
    h = hashlib.sha256()
    for name, t in sorted(vae.state_dict().items()):
        if name.startswith(ENCODING_PARTS):
            h.update(name.encode() + str(t.dtype).encode())
            h.update(t.detach().float().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _factors(config) -> dict:
    get = config.get if isinstance(config, dict) else lambda k: getattr(config, k, None)
    out = {k: get(k) for k in FACTORS}
    out["scaling_factor"] = float(out["scaling_factor"] if out["scaling_factor"] is not None else 1.0)
    out["shift_factor"] = float(out["shift_factor"] or 0.0)  # None and 0 are the same latents
    for k in ("latents_mean", "latents_std"):
        out[k] = None if out[k] is None else [float(v) for v in out[k]]
    return out


def _is_identity(factors: dict) -> bool:
    return factors["scaling_factor"] == 1.0 and factors["shift_factor"] == 0.0 and factors["latents_mean"] is None


def space_of(vae, meta: dict | None = None, where: str | None = None, encoder_hash=None) -> dict:
    """The latent space of a loaded model (``meta``: its ``vae_codec.json``; ``where``: its path;
    ``encoder_hash``: a function giving :func:`encoder_sha256`, for callers that keep it)."""
    factors = _factors(vae.config)
    teacher = ((meta or {}).get("latent_stats") or {}).get("teacher_space")
    # A distilled student still on its teacher's scaled latents (identity factors), or a codec
    # fine-tuned to keep its teacher's latents (train's fp16_safe: the teacher's factors).
    if teacher and (_is_identity(factors) or factors == {k: teacher.get(k) for k in factors}):
        return {**teacher, "codec": where or teacher.get("codec")}
    channels = vae.config.get("latent_size") or vae.config.get("latent_channels")
    digest = encoder_hash() if encoder_hash else encoder_sha256(vae)
    return {"encoder_sha256": digest, **factors, "latent_channels": int(channels), "codec": where}


def to_metadata(space: dict) -> str:
    """The space as one safetensors metadata string (sorted keys: identical runs, identical bytes)."""
    return json.dumps(space, sort_keys=True, separators=(",", ":"))


def from_metadata(text: str | None, where: str) -> dict | None:
    """A recorded space read back (None when the file records none); malformed is an error."""
    if text is None:
        return None
    try:
        space = json.loads(text)
        ok = isinstance(space, dict) and isinstance(space.get("encoder_sha256"), str)
        check_factors = {k: space[k] for k in FACTORS}
        float(check_factors["scaling_factor"]), float(check_factors["shift_factor"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{where}: malformed {SPACE_KEY} metadata (needs encoder_sha256 and "
                         f"{', '.join(FACTORS)}); was it edited by hand?")
    return space


def _same_numbers(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, list) or isinstance(b, list):
        return isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and all(
            _same_numbers(x, y) for x, y in zip(a, b))
    return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-9)


def differences(recorded: dict, codec_space: dict) -> list[str]:
    """What differs between two spaces, e.g. ``["encoder weights", "shift_factor 1.5 vs 0.0"]``."""
    out = []
    if recorded["encoder_sha256"] != codec_space["encoder_sha256"]:
        out.append(f"encoder weights {recorded['encoder_sha256'][:12]} vs {codec_space['encoder_sha256'][:12]}")
    for key in FACTORS:
        if not _same_numbers(recorded.get(key), codec_space.get(key)):
            out.append(f"{key} {describe(recorded.get(key))} vs {describe(codec_space.get(key))}")
    if recorded.get("latent_channels") not in (None, codec_space.get("latent_channels")):
        out.append(f"latent_channels {recorded['latent_channels']} vs {codec_space.get('latent_channels')}")
    return out


def describe(value) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(f"{v:.4g}" for v in value) + "]"
    return "none" if value is None else f"{value:.6g}"


def check(recorded: dict | None, codec_space: dict, what: str, force: bool = False,
          fix: str = "decode them with the codec that made them, or pass --force to decode anyway") -> str | None:
    """Refuse (``LatentSpaceMismatch``) latents ``what`` recorded in another space than the codec's,
    or recording none; with ``force``, return the warning to print instead (None when they match)."""
    if recorded is None:
        problem = (f"{what} do not say which codec made them (no {SPACE_KEY} metadata: written by an "
                   f"older vae-codec or by another tool), so {codec_space.get('codec') or 'this codec'} "
                   "cannot tell whether they are its own")
    else:
        diff = differences(recorded, codec_space)
        if not diff:
            return None
        problem = (f"{what} were made by {recorded.get('codec') or 'another codec'}, not in the latent space "
                   f"of {codec_space.get('codec') or 'this codec'} ({'; '.join(diff)}): decoding them would "
                   "give wrong images")
    if force:
        return f"warning: {problem}; decoding anyway (--force)"
    raise LatentSpaceMismatch(f"{problem}; {fix}")
