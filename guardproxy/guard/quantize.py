"""int8 weights for the guard's backbone on a CPU (``guard.quantize: int8``).

Every Linear of the backbone (attention projections, MLP: nearly all of a step's FLOPs) becomes an
``Int8Linear``: its weight rounded once to int8 with one scale per output channel, each call's
activations rounded per token, the product summed in int32 by ``torch._int_mm`` (oneDNN's VNNI kernel
on x86) and scaled back to float. The embedding, the norms and the two head pathways stay in float:
they are a sliver of the work and they set the probabilities the policy's thresholds read.

Why our own forty lines and not a library (measured on this 2-core AVX-512 VNNI machine, one
[32, 1024] x [1024, 3072] projection, 2 threads): ``torch.ao.quantization.quantize_dynamic`` is
deprecated (it warns on every use in torch 2.13 and is announced for removal); torchao 0.18's int8
dynamic-activation config ran 1.5x fp32 where ``_int_mm`` runs 2.9x, and it loads CUDA extension
libraries with warnings on a CPU-only install. bench/step.py ``--quantize none,int8`` measures a whole
step. Rounding moves the probabilities: ``guardproxy check``/``eval --quantize int8`` compare verdicts
on a user's own text, and it stays off by default until checked on the released weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from guardproxy.guard.model import Qwen3GuardStream

QUANTIZE_MODES = ("none", "int8")


class Int8Linear(nn.Module):
    """``y = x W^T`` with W in int8 (per output channel) and x rounded to int8 per row at each call."""

    weight: torch.Tensor
    weight_scale: torch.Tensor

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype) -> None:
        """``weight`` [out, in] int8 and its per-row ``scale`` (float32)."""
        super().__init__()
        # [out, in] as nn.Linear keeps it, handed to ``_int_mm`` transposed: on this CPU that ran
        # about 20% faster than an [in, out] copy, and a block of rows (a fused projection's part) is
        # a plain view.
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", scale)
        self.out_features, self.in_features = weight.shape
        self.out_dtype = out_dtype

    @classmethod
    def of(cls, linear: nn.Linear) -> Int8Linear:
        if linear.bias is not None:
            raise ValueError("Int8Linear takes bias-free layers (Qwen3's are)")
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127
        return cls(torch.round(w / scale[:, None]).to(torch.int8), scale, linear.weight.dtype)

    @classmethod
    def stacked(cls, parts: Sequence[Int8Linear]) -> Int8Linear:
        """One layer computing ``parts`` side by side; the parts go on reading views of its weight."""
        fused = cls(
            torch.cat([p.weight for p in parts]),
            torch.cat([p.weight_scale for p in parts]),
            parts[0].out_dtype,
        )
        at = 0
        for p in parts:
            p.weight = fused.weight[at : at + p.out_features]
            p.weight_scale = fused.weight_scale[at : at + p.out_features]
            at += p.out_features
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).float()
        scale = rows.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127
        q = torch.round(rows / scale).to(torch.int8)
        y = torch._int_mm(q, self.weight.t()).float() * scale * self.weight_scale
        return y.to(self.out_dtype).view(*x.shape[:-1], self.out_features)


def quantize_model(model: Qwen3GuardStream, mode: str) -> Qwen3GuardStream:
    """The model with its backbone's Linear layers in ``mode`` (in place; ``none``: as it is)."""
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_MODES)}, got {mode!r}")
    if mode == "none":
        return model
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise ValueError(f"quantize: int8 runs on a CPU (the guard is on {device}); on a GPU use bfloat16")
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, Int8Linear.of(child))
    return model
