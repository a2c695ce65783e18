"""Single-file checkpoints in the original CompVis/LDM key layout (ComfyUI, A1111, Forge ...).

One ``.safetensors`` file with keys like ``encoder.down.0.block.0.norm1.weight`` instead of a
diffusers folder. Reading uses diffusers' own converter
(``diffusers.loaders.single_file_utils.convert_ldm_vae_checkpoint``); writing is its exact
inverse (:func:`diffusers_to_ldm`), so diffusers -> single file -> diffusers is bit-exact.

LDM's mid-block attention uses 1x1 convolutions for q/k/v/proj_out (4-D weights); diffusers
uses Linear layers (2-D). Key prefixes ``first_stage_model.`` / ``vae.`` (full SD checkpoints)
are accepted on reading.

A foreign file carries no config: the architecture is inferred from tensor shapes
(:func:`infer_config`). Files we write store the diffusers config and our metadata in the
safetensors header, so they round-trip exactly, ``scaling_factor`` included.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import (
    DIFFUSERS_TO_LDM_MAPPING,
    LDM_VAE_DEFAULT_SCALING_FACTOR,
    LDM_VAE_KEYS,
    convert_ldm_vae_checkpoint,
)
from safetensors import safe_open
from safetensors.torch import load_file

from codec.reproducible import save_safetensors

CONFIG_KEY = "vae_codec_config"  # safetensors metadata: the diffusers config (JSON)
META_KEY = "vae_codec_meta"  # safetensors metadata: our vae_codec.json (JSON)
LDM_NORM_GROUPS = 32  # LDM's Normalize() always uses 32 groups; shapes cannot tell it

_TOP = dict(DIFFUSERS_TO_LDM_MAPPING["vae"])
_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def is_single_file(path: str | os.PathLike) -> bool:
    return Path(path).is_file() and str(path).endswith(".safetensors")


# ------------------------------------------------------------------------- diffusers -> LDM
def _ldm_key(key: str, num_up: int) -> str:
    if key in _TOP:
        return _TOP[key]
    m = re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$", key)
    if m:
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    m = re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)$", key)
    if m:
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    # The decoder's blocks are numbered in the opposite order in LDM (up.0 is the last stage).
    m = re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$", key)
    if m:
        block = num_up - 1 - int(m[1])
        return f"decoder.up.{block}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    m = re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)$", key)
    if m:
        return f"decoder.up.{num_up - 1 - int(m[1])}.upsample.conv.{m[2]}"
    m = re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)$", key)
    if m:
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    m = re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\."
                 r"(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)$", key)
    if m:
        return f"{m[1]}.mid.attn_1.{_ATTN[m[2]]}.{m[3]}"
    raise ValueError(f"no LDM name for the diffusers AutoencoderKL key {key!r}")


def diffusers_to_ldm(state_dict: dict[str, torch.Tensor], num_up_blocks: int) -> dict[str, torch.Tensor]:
    """A diffusers ``AutoencoderKL`` state dict -> the CompVis/LDM layout."""
    out = {}
    for key, tensor in state_dict.items():
        new = _ldm_key(key, num_up_blocks)
        if ".mid.attn_1." in new and new.rsplit(".", 2)[-2] in ("q", "k", "v", "proj_out") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # Linear -> 1x1 conv
        out[new] = tensor.contiguous()
    return out


# ------------------------------------------------------------------------- LDM -> diffusers
# Saved by LDM's training but not part of the autoencoder: the loss (LPIPS, discriminator) and
# EMA bookkeeping of unpruned VAE checkpoints.
TRAINING_ONLY = ("loss.", "model_ema.")


def strip_prefix(state_dict: dict) -> dict:
    """Keep the VAE of a full SD checkpoint (``first_stage_model.``/``vae.`` prefixes)."""
    for prefix in LDM_VAE_KEYS:
        if any(k.startswith(prefix) for k in state_dict):
            return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return state_dict


def drop_training_only(state_dict: dict) -> tuple[dict, list[str]]:
    dropped = sorted(k for k in state_dict if k.startswith(TRAINING_ONLY))
    return {k: v for k, v in state_dict.items() if not k.startswith(TRAINING_ONLY)}, dropped


# A file cannot say its latent factors. Assumed where it has none: SD's for 4 latent channels;
# for 16, FLUX.1's for a bare VAE file (its ae.safetensors) and SD3's for one inside a full
# checkpoint (first_stage_model. prefix). (scaling_factor, shift_factor, whose)
ASSUMED_FACTORS = {(4, False): (LDM_VAE_DEFAULT_SCALING_FACTOR, None, "SD's"),
                   (4, True): (LDM_VAE_DEFAULT_SCALING_FACTOR, None, "SD's"),
                   (16, False): (0.3611, 0.1159, "FLUX.1's"),
                   (16, True): (1.5305, 0.0609, "SD3's")}


def infer_config(ldm: dict[str, torch.Tensor], scaling_factor: float | None = None, prefixed: bool = False) -> dict:
    """``AutoencoderKL`` arguments from the shapes of an LDM-layout state dict (``prefixed``: it
    came from a full checkpoint, which decides the factors assumed for 16 channels)."""
    required = ("encoder.conv_in.weight", "decoder.conv_in.weight", "decoder.conv_out.weight")
    missing = [k for k in required if k not in ldm]
    if missing:
        raise ValueError(f"not an LDM/CompVis VAE checkpoint: missing {missing}")
    levels = sorted({int(m[1]) for k in ldm if (m := re.match(r"encoder\.down\.(\d+)\.block\.", k))})
    if not levels:
        raise ValueError("not an LDM/CompVis VAE checkpoint: no encoder.down.N.block.M tensors")
    channels = [ldm[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in levels]
    layers = len({m[1] for k in ldm if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))})
    latent = ldm["decoder.conv_in.weight"].shape[1]
    n = len(levels)
    return dict(
        in_channels=ldm["encoder.conv_in.weight"].shape[1],
        out_channels=ldm["decoder.conv_out.weight"].shape[0],
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        block_out_channels=channels,
        layers_per_block=layers,
        latent_channels=latent,
        norm_num_groups=LDM_NORM_GROUPS,
        act_fn="silu",
        use_quant_conv="quant_conv.weight" in ldm,
        use_post_quant_conv="post_quant_conv.weight" in ldm,
        mid_block_add_attention="encoder.mid.attn_1.q.weight" in ldm,
        **assumed_factors(latent, prefixed, scaling_factor),
    )


def assumed_factors(latent_channels: int, prefixed: bool, scaling_factor: float | None) -> dict:
    if scaling_factor is not None:
        return {"scaling_factor": scaling_factor}
    scale, shift, _ = ASSUMED_FACTORS.get((latent_channels, prefixed), ASSUMED_FACTORS[(4, prefixed)])
    return {"scaling_factor": scale, **({"shift_factor": shift} if shift is not None else {})}


def ldm_to_diffusers(ldm: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """diffusers' converter, checked: every tensor of the file must land in the model."""
    converted = convert_ldm_vae_checkpoint(ldm, config)
    # The converter skips what it does not know; name what was left behind.
    placed = {_ldm_key(k, len(config["up_block_types"])) for k in converted}
    unused = sorted(set(ldm) - placed)
    if unused:
        raise ValueError(
            f"{len(unused)} tensor(s) of the file have no place in an AutoencoderKL "
            f"(for example {unused[:3]}); is it a kl-f8 style VAE?"
        )
    return converted


# What the UIs' own VAE loaders build (ComfyUI's, A1111's): Stable Diffusion's widths, two
# ResNet blocks per level and 32 GroupNorm groups; checked with ComfyUI's loader, which rejects
# our tiny/small/test files and matches diffusers to 2e-5 on an sd-kl-f8-shaped one.
UI_ARCHITECTURE = {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32}


def ui_incompatibility(config) -> str | None:
    """Why ComfyUI/A1111 cannot load a single file of this architecture, or None if they can."""
    get = config.get if isinstance(config, dict) else lambda k: getattr(config, k, None)
    wrong = [f"{k}={list(v) if isinstance(v, (list, tuple)) else v} (UIs build {UI_ARCHITECTURE[k]})"
             for k in UI_ARCHITECTURE
             for v in [get(k)] if (list(v) if isinstance(v, (list, tuple)) else v) != UI_ARCHITECTURE[k]]
    return "; ".join(wrong) or None


# ------------------------------------------------------------------------- files
def save_single_file(vae: AutoencoderKL, path: str | os.PathLike, meta: dict | None = None) -> Path:
    """Write ``vae`` (fp32) as one LDM-layout file, our config and metadata in its header. Only an
    ``AutoencoderKL`` has an LDM layout: other kinds are refused with what to use instead."""
    if type(vae).__name__ != "AutoencoderKL":
        raise ValueError(f"a single-file (CompVis/LDM layout) export needs an AutoencoderKL; this codec's class is "
                         f"{type(vae).__name__}: export it as a diffusers folder (--format diffusers)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu() for k, v in vae.state_dict().items()}
    ldm = diffusers_to_ldm(state, len(vae.config.up_block_types))
    config = {k: v for k, v in vae.config.items() if not k.startswith("_")}
    header = {"format": "pt", CONFIG_KEY: json.dumps(config), META_KEY: json.dumps(meta or {}, default=str)}
    save_safetensors(ldm, path, metadata=header)  # sorted header: byte-identical exports
    return path


def read_header(path: str | os.PathLike) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def load_single_file(
    path: str | os.PathLike, scaling_factor: float | None = None
) -> tuple[AutoencoderKL, dict]:
    """An LDM-layout file (ours or e.g. a downloaded SD VAE) -> ``(AutoencoderKL, meta)``.

    Our files restore their stored config; foreign ones get an architecture inferred from
    the shapes and ``scaling_factor`` (default SD's 0.18215, which a file cannot say).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such single-file checkpoint")
    header = read_header(path)
    tensors = load_file(str(path))
    prefixed = any(k.startswith(prefix) for prefix in LDM_VAE_KEYS for k in tensors)
    ldm, dropped = drop_training_only(strip_prefix(tensors))
    if dropped:  # recorded in the metadata and said, never silently
        print(f"{path}: ignored {len(dropped)} training-only tensor(s) ({dropped[0]} ...)", file=sys.stderr)
    try:
        if CONFIG_KEY in header:
            config = json.loads(header[CONFIG_KEY])
            if scaling_factor is not None:
                config["scaling_factor"] = scaling_factor
            meta = json.loads(header.get(META_KEY, "{}"))
        else:
            config = infer_config(ldm, scaling_factor, prefixed)
            meta = {"single_file": str(path), "config_inferred": True}
            if scaling_factor is None:
                whose = ASSUMED_FACTORS.get((config["latent_channels"], prefixed), ASSUMED_FACTORS[(4, prefixed)])[2]
                shift = f", shift_factor {config['shift_factor']}" if "shift_factor" in config else ""
                print(
                    f"{path}: no config stored; architecture inferred from the tensor shapes "
                    f"({config['latent_channels']} latent channels), scaling_factor assumed {config['scaling_factor']}"
                    f"{shift} ({whose}); measure them with `vae-codec scale{' --shift' if shift else ''}` if this "
                    f"VAE is not {whose[:-2]}'s",
                    file=sys.stderr,
                )
        state = ldm_to_diffusers(ldm, config)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    vae = AutoencoderKL.from_config(config)
    missing, unexpected = vae.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path}: the weights do not fit the architecture (missing {missing[:4]}, "
            f"unexpected {unexpected[:4]})"
        )
    if dropped:
        meta["ignored_training_tensors"] = len(dropped)
    return vae, meta
