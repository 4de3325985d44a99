"""What the CPU can do that changes results, not only speed: integer products on x86.

x86 CPUs without VNNI multiply an int8 model's u8 x s8 operands through a 16-bit
intermediate that saturates on pairs of large products (export/quantize.py has the
arithmetic), so a model with 8-bit weights gives wrong scores there. The CPU int8 model
msn-edge exports has 7-bit weights and records it in its metadata; an older one does not.
"""

from __future__ import annotations

import platform
from pathlib import Path

WEIGHT_BITS_KEY = "int8_weight_bits"  # Q/DQ model metadata: its weights' bits ("7", "8")
SAFE_WEIGHT_BITS = "7"  # 2 x 255 x 64 fits in 16 bits; 2 x 255 x 127 does not
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni"})  # /proc/cpuinfo names
X86_MACHINES = frozenset({"x86_64", "amd64", "i386", "i686"})
CPUINFO = Path("/proc/cpuinfo")


def x86_without_vnni(cpuinfo: Path = CPUINFO, machine: str | None = None) -> bool:
    """Whether this is an x86 CPU without VNNI. An x86 whose flags cannot be read counts
    as one: refusing an old int8 model there costs a re-export, a wrong score costs more."""
    if (machine or platform.machine()).lower() not in X86_MACHINES:
        return False
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return True
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return not flags & VNNI_FLAGS


def int8_refusal(
    weight_bits: str | None, cpuinfo: Path = CPUINFO, machine: str | None = None
) -> str | None:
    """Why this CPU would compute a CPU int8 model with `weight_bits` wrongly, or None."""
    if weight_bits == SAFE_WEIGHT_BITS or not x86_without_vnni(cpuinfo, machine):
        return None
    return (
        "this x86 CPU has no VNNI, and with the model's 8-bit weights ONNX Runtime's int8 "
        "products saturate: its scores would be wrong. Run fp32, or export the run again "
        "with this msn-edge (its CPU int8 model has 7-bit weights)"
    )
