"""Device names from the command line, checked before any work starts."""

from __future__ import annotations

from search.errors import StudyError


def check_device(name: str) -> str:
    """`cpu`, `cuda`, `cuda:N` or `mps`, available on this machine; else a clear error."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise StudyError(f"--device {name!r}: not a device name (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise StudyError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise StudyError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise StudyError(f"--device {name}: MPS is not available on this machine")
    elif device.type not in {"cpu", "cuda", "mps"}:
        raise StudyError(f"--device {name}: unsupported device type {device.type}")
    return str(device)
