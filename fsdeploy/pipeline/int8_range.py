"""Which INT8 weight range this CPU's ONNX Runtime kernels compute exactly: full 8-bit, or 7-bit.

ONNX Runtime's x86 u8 x s8 kernels on CPUs with only AVX2 (or AVX-512 without VNNI) multiply with
`vpmaddubsw`, which adds pairs of u8 x s8 products into a saturating int16: two full-range products
(255 x 127 x 2 = 64,770) overflow it, so ONNX Runtime's quantizer offers `reduce_range` (7-bit weights,
at most 255 x 63 x 2 = 32,130, which fits). VNNI (`vpdpbusd`, AVX512-VNNI or AVX-VNNI) and AMX-INT8
accumulate straight into int32, so full range is exact there, and the 7-bit default only costs accuracy
(measured on this project's trained glyph efficientnet_b0: min feature cosine 0.246 at 7-bit vs 0.927 at
full range on an AVX512-VNNI CPU). ARM's dot-product kernels (`asimddp`/`sdot`) accumulate in int32 too.

The choice is made for the CPU `fsdeploy quantize` runs on; serve the INT8 graph on CPUs of the same kind.
"""
from __future__ import annotations

from dataclasses import dataclass

# flag -> name shown in reports, best first
_FULL_RANGE_FLAGS = (("amx_int8", "AMX-INT8"), ("avx512_vnni", "AVX512-VNNI"), ("avx_vnni", "AVX-VNNI"), ("asimddp", "ARM dot product"))


@dataclass(frozen=True)
class Int8Kernels:
    """What the CPU's INT8 kernels need: `full_range` True when full 8-bit weights are exact."""

    full_range: bool
    isa: str  # e.g. "AVX512-VNNI", "AVX2 without VNNI"

    @property
    def weights(self) -> str:
        return "full-range 8-bit" if self.full_range else "7-bit (reduce_range)"


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """Feature flags of the first CPU in /proc/cpuinfo (`flags` on x86, `Features` on ARM); empty if unreadable."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def int8_kernels(flags: set[str] | None = None) -> Int8Kernels:
    """The INT8 weight range for a CPU with `flags` (default: this machine's)."""
    flags = cpu_flags() if flags is None else flags
    for flag, name in _FULL_RANGE_FLAGS:
        if flag in flags:
            return Int8Kernels(True, name)
    if "avx2" in flags:
        return Int8Kernels(False, "AVX2 without VNNI")
    return Int8Kernels(False, "no VNNI or dot-product flags found")  # unknown kernels: the range that cannot saturate
