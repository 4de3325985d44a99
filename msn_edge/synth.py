"""Synthetic machine sounds with physically motivated faults, in the DCASE 2020 layout.

A seeded numpy generator, so that training, evaluation, export and the monitor can be
tried end to end without downloading a data set, and so that tests can check that a
model tells faults from normal operation. Three machine families:

- `fan` (rotating): shaft harmonics with slow speed drift, blade-pass tones, coloured
  aerodynamic noise with structural resonances. Faults: `bearing` (outer-race defect
  impacts at the defect frequency, ringing a high resonance), `imbalance` (stronger 1x
  shaft tone and blade-pass sidebands at ±1x), `rubbing` (friction bursts once per
  revolution during contact episodes).
- `valve` (reciprocating): open/close impacts ringing the valve body's modes, flow hiss
  while open, a noise floor. Faults: `missing` impacts, `extra` impacts (bounce),
  `shifted` closing (a sticking valve).
- `slider` (linear guide): band noise whose level and centre follow the carriage speed,
  a motor tone proportional to speed. Faults: `rubbing` (dry friction bursts while
  moving), `rail_damage` (an impact each time the carriage passes a dent).

Each machine ID is a distinct machine (its own speeds, resonances and levels, drawn from
the seed); each clip varies in phase, speed, gain and noise. Fault levels are stated
relative to the clip (ANOMALY_DB) so that a small model does clearly better than chance
without the task being trivial.

One file on purpose (over 400 lines): the three families share their building blocks
(noise shapes, impacts, levels, fault gating) and read best side by side.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import soundfile as sf

from msn_edge.runtime.errors import DatasetError
from msn_edge.runtime.version import __version__

KINDS: tuple[str, ...] = ("fan", "valve", "slider")
ANOMALIES: dict[str, tuple[str, ...]] = {
    "fan": ("bearing", "imbalance", "rubbing"),
    "valve": ("missing", "extra", "shifted"),
    "slider": ("rubbing", "rail_damage"),
}
# Level of an added fault component: its RMS over the faulty stretch relative to the
# normal sound's RMS, in dB, drawn per clip. The valve faults change the impact schedule
# instead, so their level is that of the impacts they add or remove.
ANOMALY_DB: dict[tuple[str, str], tuple[float, float]] = {
    ("fan", "bearing"): (-26.0, -16.0),
    ("fan", "imbalance"): (-20.0, -10.0),
    ("fan", "rubbing"): (-32.0, -22.0),
    ("slider", "rubbing"): (-34.0, -24.0),
    ("slider", "rail_damage"): (-36.0, -26.0),
}

SAMPLE_RATE = 16_000  # DCASE clips
MIN_SAMPLE_RATE = 16_000  # the machine models put content up to ~7 kHz
SUBTYPE = "PCM_16"  # DCASE clips are 16-bit PCM
TARGET_DBFS = -26.0  # RMS level of a clip, typical of the DCASE recordings
MACHINE_LEVEL_DB = 3.0  # ± spread of the level between machines (distance to the mic)
CLIP_GAIN_DB = 1.5  # ± spread of the gain between clips of one machine
HEADROOM = 0.5  # a normal clip peaks at most here, so faults on top rarely reach full scale
PEAK = 0.99  # last-resort limit: a louder clip is scaled down, never clipped
FLOW_RAMP_S = 0.01  # a valve's flow noise starts and stops within ~10 ms
STREAM_RAMP_S = 0.25  # fade of a fault in and out of a stream (no clicks at the joins)
VALVE_SETTLE_S = 0.5  # valve faults start this long before their stretch ends, to ring out
MANIFEST = "synth.json"
# Independent rng streams of one machine: one per (split, label) of a data set, one for
# synth_stream.
_STREAMS = {("train", "normal"): 0, ("test", "normal"): 1, ("test", "anomaly"): 2}
_STREAM = 3


# ---------------------------------------------------------------------------------------
# Machines: the fixed physics of one ID, drawn from (seed, kind, ID).


@dataclass(frozen=True)
class Fan:
    shaft_hz: float  # rotation speed: 16-45 Hz = 950-2700 rpm
    blades: int  # blade-pass frequency = blades x shaft_hz
    shaft_amps: tuple[float, ...]  # shaft harmonics 1x, 2x, ... (noise RMS = 1)
    bpf_amps: tuple[float, ...]  # blade-pass harmonics
    tilt: float  # aerodynamic noise falls as f^-tilt
    hump_hz: float  # broadband hump of the flow noise
    resonances_hz: tuple[float, ...]  # casing modes lifting the noise
    bearing_ratio: float  # outer-race defect frequency / shaft (ball count, geometry)
    bearing_hz: float  # resonance the defect impacts ring
    rub_hz: float  # centre of the rotor-stator friction noise
    level_db: float


@dataclass(frozen=True)
class Valve:
    period_s: float  # one open/close cycle
    duty: float  # share of the cycle the valve is open
    open_modes: tuple[tuple[float, float, float], ...]  # (Hz, decay s, weight) of the body
    close_modes: tuple[tuple[float, float, float], ...]
    close_gain: float  # closing impact relative to opening
    hiss_band_hz: tuple[float, float]  # flow noise while open
    hiss_rms: float  # relative to a unit impact
    floor_rms: float  # background noise floor
    level_db: float


@dataclass(frozen=True)
class Slider:
    stroke_s: float  # one back-and-forth cycle of the carriage
    band_hz: float  # centre of the sliding noise at mid speed
    bandwidth_hz: float
    fm_depth: float  # relative shift of the band centre from standstill to full speed
    motor_hz: float  # motor / ball-screw tone at full speed
    motor_amp: float  # relative to the sliding noise
    contact_rms: float  # broadband contact noise at full speed
    floor_rms: float
    dent_at: float  # rail dent position in the stroke, -1..1
    rail_hz: float  # rail resonance the dent impacts ring
    rub_hz: float  # centre of the dry-friction noise
    level_db: float


Machine = Fan | Valve | Slider


def machine(kind: str, machine_id: int, *, seed: int = 0) -> Machine:
    """The fixed parameters of machine `machine_id` of `kind` for a data set `seed`."""
    r = np.random.default_rng([seed, _kind_index(kind), machine_id])
    u = lambda lo, hi: float(r.uniform(lo, hi))  # noqa: E731
    level = u(-MACHINE_LEVEL_DB, MACHINE_LEVEL_DB)
    if kind == "fan":
        a1, b1 = u(0.05, 0.15), u(0.08, 0.25)
        return Fan(
            shaft_hz=u(16.0, 45.0),
            blades=int(r.choice([5, 6, 7, 9, 11])),
            shaft_amps=tuple(a1 * u(0.3, 1.0) / k for k in range(1, 5)),
            bpf_amps=tuple(b1 * u(0.2, 0.6) ** j for j in range(3)),
            tilt=u(0.3, 0.7),
            hump_hz=u(300.0, 1500.0),
            resonances_hz=(u(1000.0, 2500.0), u(2500.0, 5000.0)),
            bearing_ratio=u(2.9, 3.6),
            bearing_hz=u(2500.0, 5000.0),
            rub_hz=u(3000.0, 6000.0),
            level_db=level,
        )
    if kind == "valve":
        modes = lambda: tuple(  # noqa: E731
            (u(800.0, 5000.0), u(0.004, 0.02), u(0.3, 1.0)) for _ in range(3)
        )
        hiss_lo = u(1500.0, 3000.0)
        return Valve(
            period_s=u(0.4, 1.0),
            duty=u(0.3, 0.6),
            open_modes=modes(),
            close_modes=modes(),
            close_gain=u(0.6, 1.2),
            hiss_band_hz=(hiss_lo, hiss_lo + u(1000.0, 3000.0)),
            hiss_rms=u(0.005, 0.015),
            floor_rms=u(0.002, 0.006),
            level_db=level,
        )
    return Slider(
        stroke_s=u(1.0, 2.5),
        band_hz=u(600.0, 2500.0),
        bandwidth_hz=u(300.0, 1000.0),
        fm_depth=u(0.1, 0.3),
        motor_hz=u(150.0, 600.0),
        motor_amp=u(0.1, 0.4),
        contact_rms=u(0.1, 0.3),
        floor_rms=u(0.05, 0.15),
        dent_at=u(-0.7, 0.7),
        rail_hz=u(1500.0, 4000.0),
        rub_hz=u(4000.0, 6500.0),
        level_db=level,
    )


# ---------------------------------------------------------------------------------------
# Signal pieces.


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def _slow(rng: np.random.Generator, n: int, sr: int, knots_per_s: float) -> np.ndarray:
    """A smooth random process of unit spread: random knots, linearly interpolated."""
    k = int(n / sr * knots_per_s) + 2
    return np.interp(np.arange(n) * (knots_per_s / sr), np.arange(k), rng.standard_normal(k))


def _shaped_noise(
    rng: np.random.Generator, n: int, sr: int, gain: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """Gaussian noise of unit RMS whose amplitude spectrum follows gain(f)."""
    f = np.fft.rfftfreq(n, 1.0 / sr)
    spec = (rng.standard_normal(f.size) + 1j * rng.standard_normal(f.size)) * gain(f)
    y = np.fft.irfft(spec, n)
    return y / _rms(y)


def _band(lo: float, hi: float) -> Callable[[np.ndarray], np.ndarray]:
    """A band-pass gain with raised-cosine skirts (no ringing of a brick wall)."""
    skirt = 0.15 * (hi - lo)

    def gain(f: np.ndarray) -> np.ndarray:
        rise = np.clip((f - (lo - skirt)) / (2 * skirt), 0.0, 1.0)
        fall = np.clip(((hi + skirt) - f) / (2 * skirt), 0.0, 1.0)
        return np.sin(0.5 * np.pi * rise) ** 2 * np.sin(0.5 * np.pi * fall) ** 2

    return gain


def _impacts(
    times_s: np.ndarray,
    amps: np.ndarray,
    modes: Sequence[tuple[float, float, float]],
    n: int,
    sr: int,
) -> np.ndarray:
    """Impacts at `times_s`, each ringing the resonant `modes` (Hz, decay s, weight).

    Overlap-add of one impulse response per impact: impacts are sparse (tens to a few
    thousand per clip), which makes this cheaper than an FFT convolution.
    """
    ir_len = int(5 * max(d for _, d, _ in modes) * sr)
    t = np.arange(ir_len) / sr
    ir = sum(w * np.exp(-t / d) * np.sin(2 * np.pi * hz * t) for hz, d, w in modes)
    out = np.zeros(n + ir_len)
    idx = np.round(np.asarray(times_s) * sr).astype(np.int64)
    keep = (idx >= 0) & (idx < n)
    for i, a in zip(idx[keep], np.asarray(amps)[keep], strict=True):
        out[i : i + ir_len] += a * ir
    return out[:n]


def _bursts(
    rng: np.random.Generator,
    starts_s: np.ndarray,
    durations_s: np.ndarray,
    n: int,
    sr: int,
) -> np.ndarray:
    """An envelope of Hann-shaped bursts (for friction noise), values in [0, 1]."""
    env = np.zeros(n)
    for start, dur in zip(starts_s, durations_s, strict=True):
        a, m = int(start * sr), max(int(dur * sr), 2)
        if a >= n:
            continue
        win = np.hanning(m)[: n - a] * rng.uniform(0.5, 1.0)
        env[a : a + win.size] = np.maximum(env[a : a + win.size], win)
    return env


def _episodes(rng: np.random.Generator, n: int, sr: int, share: float, start: int) -> np.ndarray:
    """A mask of intermittent episodes (0.3-2 s each) covering about `share` of the time
    from sample `start` on, the first one beginning there."""
    mask = np.zeros(n, dtype=bool)
    t, total, on = start / sr, n / sr, True
    while t < total:
        length = rng.uniform(0.3, 2.0) if on else rng.uniform(0.3, 2.0) * (1 - share) / share
        if on:
            mask[int(t * sr) : int((t + length) * sr)] = True
        t, on = t + length, not on
    return mask


def _at_level(
    component: np.ndarray, reference: np.ndarray, db: float, gate: np.ndarray
) -> np.ndarray:
    """Scale a fault so its RMS where it is active is `db` below/above the reference's."""
    active = gate > 0
    level = _rms(component[active]) if active.any() else 0.0
    if level == 0.0:
        return component * 0.0
    return component * gate * (_rms(reference) * 10 ** (db / 20) / level)


# ---------------------------------------------------------------------------------------
# The three families. Each returns (normal sound, fault component or None); the normal
# part draws only from `rng` and the fault only from `arng`, so a clip with a fault is the
# same normal clip plus the fault (the tests measure the fault that way).


def _fan(m: Fan, rng, arng, n, sr, anomaly, gate, span):
    speed = m.shaft_hz * (1 + rng.normal(0.0, 0.003)) * (1 + 0.002 * _slow(rng, n, sr, 0.5))
    phase = 2 * np.pi * np.cumsum(speed) / sr  # shaft angle, rad
    shaft_phases = rng.uniform(0, 2 * np.pi, len(m.shaft_amps))
    tones = sum(
        a * np.cos(k * phase + p)
        for k, (a, p) in enumerate(zip(m.shaft_amps, shaft_phases, strict=True), start=1)
    )
    turbulence = 1 + 0.15 * _slow(rng, n, sr, 2.0)
    bpf = [np.cos(j * m.blades * phase + rng.uniform(0, 2 * np.pi)) for j in (1, 2, 3)]
    tones = tones + turbulence * sum(a * c for a, c in zip(m.bpf_amps, bpf, strict=True))

    def flow(f: np.ndarray) -> np.ndarray:
        g = (np.maximum(f, 20.0) / 1000.0) ** -m.tilt / (1 + (f / 6000.0) ** 4)
        g = g * (1 + 2 * np.exp(-0.5 * (np.log2(np.maximum(f, 1.0) / m.hump_hz) / 0.8) ** 2))
        for hz in m.resonances_hz:
            g = g * (1 + np.exp(-0.5 * ((f - hz) / 120.0) ** 2))
        return g

    flow_noise = _shaped_noise(rng, n, sr, flow)
    normal = flow_noise + tones
    if anomaly is None:
        return normal, None
    if anomaly == "bearing":
        # An impact each time a ball passes the defect: bearing_ratio per revolution,
        # with a little slip, each ringing the bearing housing's resonance.
        crossings = np.flatnonzero(np.diff(np.floor(m.bearing_ratio * phase / (2 * np.pi))))
        times = crossings / sr + arng.normal(
            0, 0.01 / (m.bearing_ratio * m.shaft_hz), len(crossings)
        )
        amps = arng.lognormal(0.0, 0.3, len(crossings))
        modes = ((m.bearing_hz, 0.002, 1.0), (1.7 * m.bearing_hz, 0.001, 0.5))
        fault = _impacts(times, amps, modes, n, sr)
    elif anomaly == "imbalance":
        # More imbalance: the 1x shaft tone grows (the added mass sits near the existing
        # heavy spot), and the wobbling rotor modulates the blade-pass tone (sidebands at
        # BPF ± shaft) and the flow noise at 1x.
        wobble = np.cos(phase + shaft_phases[0] + arng.normal(0.0, 0.3))
        fault = wobble * (1 + 0.5 * bpf[0] + flow_noise)
    else:  # rubbing
        # The rotor touches the stator once per revolution during contact episodes.
        revs = np.flatnonzero(np.diff(np.floor(phase / (2 * np.pi)))) / sr
        contact = _episodes(arng, n, sr, arng.uniform(0.3, 0.7), span[0])
        revs = revs[contact[(revs * sr).astype(int)]]
        period = 1 / m.shaft_hz
        env = _bursts(arng, revs, arng.uniform(0.15, 0.3, len(revs)) * period, n, sr)
        band = _band(m.rub_hz - 800.0, m.rub_hz + 800.0)
        fault = env * _shaped_noise(arng, n, sr, band)
    return normal, _at_level(fault, normal, arng.uniform(*ANOMALY_DB["fan", anomaly]), gate)


def _valve(m: Valve, rng, arng, n, sr, anomaly, gate, span):
    first = rng.uniform(0, m.period_s)
    opens = np.arange(first, n / sr, m.period_s)
    closes = opens + m.duty * m.period_s
    jitter = lambda t: t + rng.normal(0, 0.002, t.size)  # noqa: E731
    opens, closes = jitter(opens), jitter(closes)
    open_amps = rng.lognormal(0.0, 0.15, opens.size)
    close_amps = m.close_gain * rng.lognormal(0.0, 0.15, closes.size)
    hiss = m.hiss_rms * _shaped_noise(rng, n, sr, _band(*m.hiss_band_hz))

    def is_open(o: np.ndarray, c: np.ndarray) -> np.ndarray:
        """1 while open, 0 while closed; the flow starts and stops over FLOW_RAMP_S."""
        r = FLOW_RAMP_S / 2
        knots = np.stack([o - r, o + r, c - r, c + r], axis=1).ravel()
        values = np.tile([0.0, 1.0, 1.0, 0.0], o.size)
        return np.interp(np.arange(n) / sr, knots, values)

    floor = m.floor_rms * _shaped_noise(rng, n, sr, lambda f: 1 / np.sqrt(np.maximum(f, 20.0)))
    normal = (
        _impacts(opens, open_amps, m.open_modes, n, sr)
        + _impacts(closes, close_amps, m.close_modes, n, sr)
        + hiss * is_open(opens, closes)
        + floor
    )
    if anomaly is None:
        return normal, None
    # Schedule faults, written as the impacts they add (+) and remove (-): by superposition
    # the faulty clip is exactly the normal clip plus this component.
    start, stop = span[0] / sr, span[1] / sr - VALVE_SETTLE_S
    inside = lambda t: (t >= start) & (t < stop)  # noqa: E731
    if anomaly == "missing":
        # The valve fails to seat or to open fully: 5-20 % of the impacts do not happen.
        times = np.concatenate([opens, closes])
        amps = np.concatenate([open_amps, close_amps])
        cand = np.flatnonzero(inside(times))
        k = max(1, int(round(arng.uniform(0.05, 0.2) * cand.size)))
        drop = arng.choice(cand, size=min(k, cand.size), replace=False)
        is_close = drop >= opens.size
        fault = _impacts(times[drop[~is_close]], -amps[drop[~is_close]], m.open_modes, n, sr)
        fault += _impacts(times[drop[is_close]], -amps[drop[is_close]], m.close_modes, n, sr)
    elif anomaly == "extra":
        # The plunger bounces: some closings are followed 20-60 ms later by a weaker one.
        cand = np.flatnonzero(inside(closes))
        k = max(1, int(round(arng.uniform(0.2, 0.5) * cand.size)))
        pick = arng.choice(cand, size=min(k, cand.size), replace=False)
        times = closes[pick] + arng.uniform(0.02, 0.06, pick.size)
        fault = _impacts(
            times, close_amps[pick] * arng.uniform(0.4, 0.8, pick.size), m.close_modes, n, sr
        )
    else:  # shifted
        # A sticking valve closes late in some cycles: the close impact moves and the
        # flow hiss lasts longer.
        cand = np.flatnonzero(inside(closes))
        k = max(1, int(round(arng.uniform(0.2, 0.5) * cand.size)))
        pick = arng.choice(cand, size=min(k, cand.size), replace=False)
        late = closes.copy()
        late[pick] += arng.uniform(0.15, 0.4, pick.size) * (1 - m.duty) * m.period_s
        fault = _impacts(late[pick], close_amps[pick], m.close_modes, n, sr)
        fault -= _impacts(closes[pick], close_amps[pick], m.close_modes, n, sr)
        fault += hiss * (is_open(opens, late) - is_open(opens, closes))
    return normal, fault


def _slider(m: Slider, rng, arng, n, sr, anomaly, gate, span):
    stroke = m.stroke_s * (1 + rng.normal(0.0, 0.01))
    angle = 2 * np.pi * np.arange(n) / (stroke * sr) + rng.uniform(0, 2 * np.pi)
    position, speed = np.sin(angle), np.abs(np.cos(angle))  # -1..1, 0..1
    # Sliding noise: a narrow band (complex baseband noise) moved to a centre that
    # rises with speed (FM), its level following speed (AM).
    base = np.fft.ifft(
        (rng.standard_normal(n) + 1j * rng.standard_normal(n))
        * (np.abs(np.fft.fftfreq(n, 1.0 / sr)) < m.bandwidth_hz / 2)
    )
    centre = m.band_hz * (1 + m.fm_depth * (speed - 0.5))
    sliding = np.real(base * np.exp(2j * np.pi * np.cumsum(centre) / sr))
    sliding = sliding / _rms(sliding) * (0.1 + speed**1.5)
    motor_phase = 2 * np.pi * np.cumsum(m.motor_hz * speed) / sr
    motor = (
        m.motor_amp
        * speed
        * sum(np.cos(k * motor_phase + rng.uniform(0, 2 * np.pi)) / k for k in (1, 2, 3))
    )
    # Broadband contact noise while moving, over a constant background floor.
    pink = _shaped_noise(rng, n, sr, lambda f: 1 / np.sqrt(np.maximum(f, 20.0)))
    normal = sliding + motor + (m.floor_rms + m.contact_rms * speed) * pink
    if anomaly is None:
        return normal, None
    if anomaly == "rubbing":
        # Dry friction (no grease): short high-frequency bursts while the carriage moves.
        rate = arng.uniform(8.0, 20.0)  # bursts per second while moving
        starts = np.sort(arng.uniform(0, n / sr, int(rate * n / sr)))
        moving = speed[(starts * sr).astype(int)] > 0.3
        env = _bursts(arng, starts[moving], arng.uniform(0.01, 0.04, moving.sum()), n, sr)
        fault = env * _shaped_noise(arng, n, sr, _band(m.rub_hz - 700.0, m.rub_hz + 700.0))
    else:  # rail_damage
        # An impact each time the carriage passes the dent, harder at higher speed.
        crossings = np.flatnonzero(np.diff(np.sign(position - m.dent_at)))
        amps = speed[crossings] * arng.lognormal(0.0, 0.2, crossings.size)
        modes = ((m.rail_hz, 0.004, 1.0), (2.3 * m.rail_hz, 0.002, 0.4))
        fault = _impacts(crossings / sr, amps, modes, n, sr)
    return normal, _at_level(fault, normal, arng.uniform(*ANOMALY_DB["slider", anomaly]), gate)


_FAMILIES = {"fan": _fan, "valve": _valve, "slider": _slider}


def at_speed(m: Machine, factor: float) -> Machine:
    """The same machine run `factor` times as fast (another operating point).

    A fan's shaft turns faster, a valve cycles faster, a slider's carriage strokes faster,
    as when a plant changes a machine's load or set-point: the domain shift that
    `synthesize(test_speed=...)` puts between training and test clips.
    """
    if factor <= 0:
        raise ValueError(f"speed factor must be > 0, got {factor}")
    if isinstance(m, Fan):
        return replace(m, shaft_hz=m.shaft_hz * factor)
    if isinstance(m, Valve):
        return replace(m, period_s=m.period_s / factor)
    return replace(m, stroke_s=m.stroke_s / factor)


def _kind_index(kind: str) -> int:
    if kind not in KINDS:
        raise ValueError(f"unknown machine kind {kind!r}; expected one of {KINDS}")
    return KINDS.index(kind)


def _render(
    kind: str,
    m: Machine,
    rng: np.random.Generator,
    n: int,
    sr: int,
    anomaly: str | None,
    span: tuple[int, int],
) -> np.ndarray:
    """Normal sound, plus the fault over samples span[0]:span[1], at the clip's gain."""
    if sr < MIN_SAMPLE_RATE:
        raise ValueError(f"sample_rate must be >= {MIN_SAMPLE_RATE}, got {sr}")
    if anomaly is not None and anomaly not in ANOMALIES[kind]:
        raise ValueError(f"unknown {kind} anomaly {anomaly!r}; expected one of {ANOMALIES[kind]}")
    rng, arng = (np.random.default_rng(s) for s in rng.integers(2**63, size=2))
    gate = _gate(n, sr, span)
    normal, fault = _FAMILIES[kind](m, rng, arng, n, sr, anomaly, gate, span)
    level_db = TARGET_DBFS + m.level_db + rng.uniform(-CLIP_GAIN_DB, CLIP_GAIN_DB)
    gain = min(10 ** (level_db / 20) / _rms(normal), HEADROOM / np.max(np.abs(normal)))
    wave = gain * (normal if fault is None else normal + fault)
    peak = np.max(np.abs(wave))
    if peak > PEAK:
        wave *= PEAK / peak
    return wave.astype(np.float32)


def _gate(n: int, sr: int, span: tuple[int, int]) -> np.ndarray:
    """1 over the faulty span, with raised-cosine fades where it starts or ends mid-signal."""
    gate = np.zeros(n)
    a, b = span
    gate[a:b] = 1.0
    ramp = min(int(STREAM_RAMP_S * sr), (b - a) // 2)
    fade = np.sin(0.5 * np.pi * np.arange(ramp) / ramp) ** 2 if ramp else np.zeros(0)
    if a > 0:
        gate[a : a + ramp] = fade
    if b < n:
        gate[b - ramp : b] = fade[::-1]
    return gate


# ---------------------------------------------------------------------------------------
# Public entry points.


def machine_clip(
    kind: str,
    machine_id: int,
    rng: np.random.Generator,
    *,
    seconds: float = 10.0,
    sample_rate: int = SAMPLE_RATE,
    anomaly: str | None = None,
    machine_seed: int = 0,
) -> np.ndarray:
    """One clip of machine `machine_id` of `kind`: float32 mono in [-1, 1).

    `rng` draws what varies between clips (phase, speed, gain, noise); `machine_seed`
    fixes the machine itself. `anomaly` (one of ANOMALIES[kind]) adds that fault over
    the whole clip. The same rng state with and without `anomaly` gives the same normal
    sound, so the fault is the difference of the two.
    """
    n = int(round(seconds * sample_rate))
    m = machine(kind, machine_id, seed=machine_seed)
    return _render(kind, m, rng, n, sample_rate, anomaly, (0, n))


def synth_stream(
    kind: str,
    machine_id: int,
    seconds_normal_before: float,
    seconds_anomaly: float,
    seconds_normal_after: float,
    *,
    seed: int = 0,
    anomaly: str | None = None,
    sample_rate: int = SAMPLE_RATE,
) -> np.ndarray:
    """A continuous recording of one machine with a faulty stretch in the middle.

    The machine runs without a break; the fault (default: the kind's first one) fades in
    and out over STREAM_RAMP_S, so there is no click at the joins. The machine is the one
    `synthesize(seed=seed)` writes, so a model trained on that data set can monitor it.
    """
    anomaly = anomaly or ANOMALIES[kind][0]
    if min(seconds_normal_before, seconds_normal_after) < 0 or seconds_anomaly <= 0:
        raise ValueError("the normal stretches must be >= 0 s and the faulty one > 0 s")
    a = int(round(seconds_normal_before * sample_rate))
    b = a + int(round(seconds_anomaly * sample_rate))
    n = b + int(round(seconds_normal_after * sample_rate))
    rng = np.random.default_rng([seed, _kind_index(kind), machine_id, _STREAM])
    m = machine(kind, machine_id, seed=seed)
    return _render(kind, m, rng, n, sample_rate, anomaly, (a, b))


def synthesize(
    out_dir: str | Path,
    *,
    seed: int = 0,
    kinds: Sequence[str] = KINDS,
    ids_per_kind: int = 2,
    n_train: int = 30,
    n_test_normal: int = 10,
    n_test_anomaly: int = 10,
    seconds: float = 10.0,
    sample_rate: int = SAMPLE_RATE,
    test_speed: float = 1.0,
    progress: bool = False,
) -> dict:
    """Write a data set in the DCASE 2020 layout and return its counts.

    `<kind>/train/normal_id_XX_NNNNNNNN.wav` and `<kind>/test/{normal,anomaly}_id_XX_
    NNNNNNNN.wav`, 16-bit PCM, plus `synth.json` (the settings, each machine's parameters
    and each anomalous file's fault). Test anomalies cycle through the kind's faults.
    Every clip has its own rng stream keyed by (seed, kind, ID, split, index), so the
    bytes depend on the settings only. OUT must be empty or not exist yet.

    The defaults (3 kinds x 2 IDs, 30 + 10 + 10 clips of 10 s each: 300 clips, 6 classes)
    take ~15 s to write and are sized for training the `tiny` preset on a CPU.
    `test_speed` != 1 runs every test clip, normal or not, at that speed (`at_speed`):
    a domain shift, normal operating points that training never heard.
    """
    from tqdm import tqdm

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DatasetError(f"{out}: already exists and is not an empty folder; choose a new one")
    kinds = list(dict.fromkeys(kinds))  # unique, in order
    for kind in kinds:
        _kind_index(kind)
    per_id = dict(zip(_STREAMS, (n_train, n_test_normal, n_test_anomaly), strict=True))
    if not kinds or min(per_id.values()) < 0 or not 0 < ids_per_kind <= 100 or seconds <= 0:
        raise ValueError("need >= 1 kind, 1-100 IDs (two digits), counts >= 0, seconds > 0")

    jobs = [
        (kind, mid, split, label, i)
        for kind in kinds
        for mid in range(ids_per_kind)
        for (split, label), count in per_id.items()
        for i in range(count)
    ]
    n = int(round(seconds * sample_rate))
    faults: dict[str, str] = {}
    for kind, mid, split, label, i in tqdm(jobs, desc="synth", unit="clip", disable=not progress):
        rng = np.random.default_rng([seed, _kind_index(kind), mid, _STREAMS[split, label], i])
        anomaly = ANOMALIES[kind][i % len(ANOMALIES[kind])] if label == "anomaly" else None
        m = machine(kind, mid, seed=seed)
        if split == "test":
            m = at_speed(m, test_speed)
        wave = _render(kind, m, rng, n, sample_rate, anomaly, (0, n))
        rel = Path(kind, split, f"{label}_id_{mid:02d}_{i:08d}.wav")
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        sf.write(out / rel, wave, sample_rate, subtype=SUBTYPE)
        if anomaly:
            faults[rel.as_posix()] = anomaly

    manifest = {
        "generator": f"msn-edge {__version__} synth",
        "seed": seed,
        "seconds": seconds,
        "sample_rate": sample_rate,
        "test_speed": test_speed,
        "machines": {
            f"{k}/id_{i:02d}": asdict(machine(k, i, seed=seed))
            for k in kinds
            for i in range(ids_per_kind)
        },
        "anomalies": faults,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    fault_counts = Counter((f.split("/")[0], a) for f, a in faults.items())
    return {
        "out_dir": str(out),
        "clips": len(jobs),
        "seconds": len(jobs) * seconds,
        "kinds": {
            k: {
                "ids": ids_per_kind,
                **{f"{s} {lab}": ids_per_kind * c for (s, lab), c in per_id.items()},
                "faults": {a: fault_counts[k, a] for a in ANOMALIES[k] if fault_counts[k, a]},
            }
            for k in kinds
        },
    }
