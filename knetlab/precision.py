"""The numeric precision a device computes in: the AMP dtype of a GPU (by its compute capability), the TF32 switch of
float32 matmuls and convolutions, and the precision's name recorded beside the Mem and fps figures (`bench/precision`).
Shared by the benchmark (`knetlab.evaluation.bench`) and the training loop."""

from __future__ import annotations

import torch

AMPERE = (8, 0)  # compute capability of the first GPUs with native bf16 and TF32 tensor cores (A100)
PRECISION_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def amp_dtype_for(capability: tuple[int, int] | None) -> torch.dtype | None:
    """bf16 from compute capability 8.0 on (Ampere and later), fp16 (trained with a GradScaler) below it; None for no
    GPU (CPUs train in float32, as published). Not `torch.cuda.is_bf16_supported()`: it also says True on V100 and T4,
    where bf16 runs emulated and slower than fp16."""
    if capability is None:
        return None
    return torch.bfloat16 if tuple(capability) >= AMPERE else torch.float16


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """The GPU's compute capability, None for any other device."""
    return tuple(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype `trainer.amp=true` trains in on `device` (see `amp_dtype_for`)."""
    return amp_dtype_for(device_capability(device))


def set_tf32(enabled: bool) -> None:
    """TF32 (10-bit mantissa) for float32 matmuls and cuDNN convolutions, which Ampere and later GPUs use; no effect on
    other devices. Off: IEEE float32 throughout, as on the reference's V100."""
    precision = "tf32" if enabled else "ieee"
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9; mixing it with allow_tf32 is an error
        torch.backends.cuda.matmul.fp32_precision = precision
        torch.backends.cudnn.conv.fp32_precision = precision
    else:
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def tf32_enabled() -> bool:
    """Whether float32 matmuls use TF32 (as `set_tf32` sets it; PyTorch's own default is off for matmuls)."""
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        return torch.backends.cuda.matmul.fp32_precision == "tf32"
    return bool(torch.backends.cuda.matmul.allow_tf32)


def precision_name(amp: torch.dtype | None, device: torch.device) -> str:
    """'bf16' or 'fp16' under autocast, else 'tf32' on a GPU that uses TF32 for float32, else 'fp32'."""
    if amp is not None:
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}[amp]
    capability = device_capability(device)
    if capability is not None and capability >= AMPERE and tf32_enabled():
        return "tf32"
    return "fp32"
