"""runtime.cpu_features: x86 CPUs whose int8 products saturate, read from /proc/cpuinfo."""

from __future__ import annotations

import pytest

from msn_edge.runtime.cpu_features import int8_refusal, x86_without_vnni

ZEN3 = "processor\t: 0\nflags\t\t: fpu sse4_1 avx avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu avx2\n"
ZEN4 = "flags\t\t: fpu avx2 avx512f avx512_vnni avx512_bf16\n"
ALDER_LAKE = "flags\t\t: fpu avx2 avx_vnni\n"


@pytest.mark.parametrize(
    ("cpuinfo", "lacks"), [(ZEN3, True), (ZEN4, False), (ALDER_LAKE, False), ("", True)]
)
def test_vnni_is_read_from_the_flags(tmp_path, cpuinfo, lacks):
    (tmp_path / "cpuinfo").write_text(cpuinfo)
    assert x86_without_vnni(tmp_path / "cpuinfo", machine="x86_64") is lacks


def test_unreadable_flags_on_x86_count_as_no_vnni_and_arm_never_saturates(tmp_path):
    assert x86_without_vnni(tmp_path / "missing", machine="x86_64") is True
    assert x86_without_vnni(tmp_path / "missing", machine="aarch64") is False


def test_only_8_bit_weights_on_an_x86_without_vnni_are_refused(tmp_path):
    (tmp_path / "old").write_text(ZEN3)
    (tmp_path / "new").write_text(ZEN4)
    old_cpu = {"cpuinfo": tmp_path / "old", "machine": "x86_64"}
    why = int8_refusal("8", **old_cpu)
    assert "no VNNI" in why and "scores would be wrong" in why and "fp32" in why
    assert int8_refusal(None, **old_cpu) == why  # a model exported before the bits were kept
    assert int8_refusal("7", **old_cpu) is None
    assert int8_refusal("8", cpuinfo=tmp_path / "new", machine="x86_64") is None
    assert int8_refusal("8", cpuinfo=tmp_path / "old", machine="aarch64") is None
