"""How large a codec's activations get: the largest magnitude each half (encoder, decoder) produces
on the images it codes, and whether float16 could hold it.

fp16's largest finite value is 65504. A codec whose activations pass it (SDXL's VAE is the famous
case: a convolution feeding a GroupNorm reaches ~1e5) gives inf and then NaN under fp16, which
:mod:`codec.precision` catches and recomputes in float32, batch by batch. This measures it in
eval: forward hooks on every leaf module of the encoder (with ``quant_conv``) and the decoder
(with ``post_quant_conv``) take each output's min and max (``aminmax``: a reduction, no copy of
a big activation).
"""

from __future__ import annotations

import math

import torch

FP16_MAX = 65504.0


def leaf_modules(vae):
    """(half, module) for every leaf module of the encoder (with ``quant_conv``) and the decoder
    (with ``post_quant_conv``): the outputs whose magnitudes fp16 must hold."""
    halves = {"encoder": [getattr(vae, "encoder", None), getattr(vae, "quant_conv", None)],
              "decoder": [getattr(vae, "post_quant_conv", None), getattr(vae, "decoder", None)]}
    for half, parts in halves.items():
        for part in parts:
            if part is None:
                continue
            for module in part.modules():
                if not any(True for _ in module.children()):
                    yield half, module


class ActivationPeaks:
    def __init__(self, vae):
        self.peaks = {"encoder": 0.0, "decoder": 0.0}
        self._handles = [module.register_forward_hook(self._hook(half)) for half, module in leaf_modules(vae)]

    def _hook(self, half: str):
        def record(module, inputs, output):
            if isinstance(output, torch.Tensor) and output.is_floating_point() and output.numel():
                low, high = torch.aminmax(output.detach())
                peak = max(-float(low), float(high))
                self.peaks[half] = math.inf if math.isnan(peak) else max(self.peaks[half], peak)
        return record

    def result(self) -> dict:
        return {"encoder_max_abs": self.peaks["encoder"], "decoder_max_abs": self.peaks["decoder"],
                "fp16_overflows": {half: peak > FP16_MAX for half, peak in self.peaks.items()}}

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def merged(results: list[dict]) -> dict:
    """One result from several processes' (the largest peaks)."""
    peaks = {half: max(r[f"{half}_max_abs"] for r in results) for half in ("encoder", "decoder")}
    return {"encoder_max_abs": peaks["encoder"], "decoder_max_abs": peaks["decoder"],
            "fp16_overflows": {half: peak > FP16_MAX for half, peak in peaks.items()}}
