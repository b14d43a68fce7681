"""Device and dtype choice: CUDA, then Apple MPS, then CPU; half precision only on GPUs."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from fetalstudio.errors import FetalStudioError

#: Device types FetalStudio runs on (``cuda:N`` picks one GPU).
DEVICE_TYPES = ("cpu", "cuda", "mps")


@dataclass(frozen=True)
class DevicePlacement:
    device: torch.device
    dtype: torch.dtype

    @property
    def label(self) -> str:
        return f"{self.device.type} / {str(self.dtype).removeprefix('torch.')}"


def available_devices() -> list[str]:
    """The devices this machine has, as they are named on the command line (cpu always)."""
    devices = ["cpu"]
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        devices += (["cuda"] + [f"cuda:{index}" for index in range(count)]) if count > 1 else ["cuda"]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def checked_device(name: str, source: str = "--device") -> torch.device:
    """``name`` as a torch device, refused with a clear message when it is not cpu/cuda/cuda:N/mps
    or this machine does not have it (``source`` says where the name came from)."""
    text = name.strip().lower()
    kind, _, index = text.partition(":")
    here = f"Available here: {', '.join(available_devices())}."
    if kind not in DEVICE_TYPES or (index and not (kind == "cuda" and index.isdigit())):
        raise FetalStudioError(f"{source} {name!r} is not a device; use cpu, cuda, cuda:N (one GPU) or mps. {here}")
    if kind == "cuda" and (not torch.cuda.is_available() or int(index or 0) >= torch.cuda.device_count()):
        has = "no CUDA GPU" if not torch.cuda.is_available() else f"{torch.cuda.device_count()} CUDA GPU(s)"
        raise FetalStudioError(f"{source} {name!r}: this machine has {has} (or PyTorch was built without CUDA). {here}")
    if kind == "mps" and "mps" not in available_devices():
        raise FetalStudioError(f"{source} {name!r}: Apple's MPS is not available on this machine. {here}")
    return torch.device(text)


def pick_device(preferred: str | None = None) -> torch.device:
    """``preferred`` (or $FETALSTUDIO_DEVICE) wins; else CUDA, MPS, CPU in that order."""
    if preferred:
        return checked_device(preferred)
    if os.environ.get("FETALSTUDIO_DEVICE"):
        return checked_device(os.environ["FETALSTUDIO_DEVICE"], "$FETALSTUDIO_DEVICE")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device: torch.device) -> torch.dtype:
    """fp32 on CPU (half is slow and inexact there); bf16 on GPUs that have it, else fp16.

    The VAE of SD 1.x overflows in fp16 less often than people think, but bf16 avoids NaNs
    entirely where the hardware supports it.
    """
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name.strip().lower()]
    except KeyError:
        raise ValueError(f"Unknown dtype {name!r}; use fp32, fp16 or bf16.") from None


def default_placement(preferred_device: str | None = None, preferred_dtype: str | None = None) -> DevicePlacement:
    """Device and dtype, each overridable ($FETALSTUDIO_DEVICE, $FETALSTUDIO_DTYPE)."""
    device = pick_device(preferred_device)
    dtype_name = preferred_dtype or os.environ.get("FETALSTUDIO_DTYPE")
    return DevicePlacement(device=device, dtype=parse_dtype(dtype_name) if dtype_name else pick_dtype(device))


def device_memory_bytes(device: torch.device) -> int | None:
    """Total memory of the device, or None when it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def free_device_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()
