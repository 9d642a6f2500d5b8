"""What the device can do and what the run uses of it: peak FLOP/s for MFU, memory.

MFU (model FLOPs utilisation) is the achieved TFLOP/s per GPU, counted with Megatron's
formula (`flops.py`), over the device's dense peak for the precision of the matmuls.
The peaks are the vendors' published dense (no sparsity) tensor-core figures; a GPU not
in the table, or a CPU, has no peak unless `--peak-tflops` gives one.

Memory is Megatron's report on CUDA (the caching allocator's allocated and reserved
bytes and their maxima). A CPU has no device allocator, so there the report gives the
process's resident memory and its maximum instead, and says so.
"""

from __future__ import annotations

import re
import resource
import sys

import torch

# Device-name marker -> dense TFLOP/s of one device: (bf16/fp16, tf32, fp32).
# A marker matches as a whole word of torch.cuda.get_device_name(), so "H100" does not
# match "GH100" and "L40" does not match "L40S"; the PCIe/NVL variants come first.
PEAK_TFLOPS: list[tuple[str, tuple[float, float, float]]] = [
    ("H100 PCIe", (756.0, 378.0, 51.0)),
    ("H100 NVL", (835.0, 418.0, 60.0)),
    ("H100", (989.0, 495.0, 67.0)),        # SXM (reports as "H100 80GB HBM3")
    ("H200 NVL", (835.0, 418.0, 60.0)),
    ("H200", (989.0, 495.0, 67.0)),
    ("GH200", (989.0, 495.0, 67.0)),
    ("H800 PCIe", (756.0, 378.0, 51.0)),
    ("H800", (989.0, 495.0, 67.0)),
    ("H20", (148.0, 74.0, 44.0)),
    ("A100", (312.0, 156.0, 19.5)),
    ("A800", (312.0, 156.0, 19.5)),
    ("A10", (125.0, 62.5, 31.2)),
    ("L40S", (362.0, 183.0, 91.6)),
    ("L40", (181.0, 90.5, 90.5)),
    ("L4", (121.0, 60.0, 30.3)),
    ("RTX A6000", (155.0, 77.4, 38.7)),
    ("RTX 4090", (165.0, 82.6, 82.6)),
    ("RTX 3090", (71.0, 35.6, 35.6)),
]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def matmul_precision(dtype: torch.dtype) -> str:
    """Which column of the table the run's matmuls use: half, tf32 or fp32."""
    if dtype in (torch.bfloat16, torch.float16):
        return "half"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"


def lookup_peak_tflops(name: str, precision: str) -> float | None:
    """The table's dense peak of a device name for a precision, None when unknown."""
    column = {"half": 0, "tf32": 1, "fp32": 2}[precision]
    for marker, peaks in PEAK_TFLOPS:
        if re.search(r"(?<![A-Za-z0-9])" + re.escape(marker) + r"(?![A-Za-z0-9])", name):
            return peaks[column]
    return None


def peak_tflops(device: torch.device, dtype: torch.dtype,
                override: float | None = None) -> float | None:
    """--peak-tflops when given, else the table's figure for this GPU; None on a CPU."""
    if override is not None:
        return override
    if device.type != "cuda" or dtype == torch.float64:
        return None  # the table has no fp64 column
    return lookup_peak_tflops(device_name(device), matmul_precision(dtype))


def mfu(tflops_per_device: float, peak: float | None) -> float | None:
    """Achieved over peak TFLOP/s (a fraction), None without a peak."""
    return None if not peak else tflops_per_device / peak


# ---------------------------------------------------------------------- memory
MB = float(2 ** 20)


def _rss_mb() -> float | None:
    """Resident memory of this process now (Linux /proc), None elsewhere."""
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * resource.getpagesize() / MB


def _max_rss_mb() -> float:
    """The largest resident memory of this process so far (getrusage: KiB on Linux,
    bytes on macOS)."""
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value / MB if sys.platform == "darwin" else value / 1024.0


def memory_stats(device: torch.device) -> dict[str, float]:
    """MB in use: Megatron's four allocator figures on CUDA, resident memory on a CPU."""
    if device.type == "cuda":
        return {"allocated": torch.cuda.memory_allocated(device) / MB,
                "max allocated": torch.cuda.max_memory_allocated(device) / MB,
                "reserved": torch.cuda.memory_reserved(device) / MB,
                "max reserved": torch.cuda.max_memory_reserved(device) / MB}
    stats = {"max rss": _max_rss_mb()}
    rss = _rss_mb()
    if rss is not None:
        stats = {"rss": rss, **stats}
    return stats


def memory_line(rank: int, iterations: int, stats: dict[str, float], device: torch.device) -> str:
    """Megatron's `[Rank N] (after N iterations) memory (MB) | allocated: ... |` line."""
    parts = [f"[Rank {rank}] (after {iterations} iterations) memory (MB)"]
    parts += [f"{name}: {value}" for name, value in stats.items()]
    line = " | ".join(parts)
    if device.type != "cuda":
        line += " | (CPU: process resident memory; there is no device allocator)"
    return line


# Megatron's TensorBoard tags for the CUDA figures; the CPU ones follow the same pattern.
MEMORY_TAGS = {"allocated": "mem-allocated-bytes", "max allocated": "mem-max-allocated-bytes",
               "reserved": "mem-reserved-bytes", "max reserved": "mem-max-reserved-bytes",
               "rss": "mem-rss-bytes", "max rss": "mem-max-rss-bytes"}
