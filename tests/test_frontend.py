"""The numpy front-end: torch parity, known answers, tiling and PCM scaling."""

import numpy as np
import pytest
import torch

from msn_edge.runtime.errors import AudioError
from msn_edge.runtime.frontend import (
    FrontendConfig,
    features,
    fit_window,
    pcm_to_float,
    spectrogram,
    utterance_spectrum,
)

CFG = FrontendConfig()


def test_shapes_match_spec_for_both_windows():
    assert (CFG.window_samples, CFG.n_freq, CFG.n_frames, CFG.spectrum_bins) == (
        160_000,
        513,
        313,
        80_000,
    )
    c18 = FrontendConfig(window_s=18.0)
    assert (c18.window_samples, c18.n_frames, c18.spectrum_bins) == (288_000, 563, 144_000)


def test_spectrogram_matches_torch_stft():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(CFG.window_samples).astype(np.float32) * 0.1
    ours = spectrogram(x, CFG)
    ref = torch.stft(
        torch.from_numpy(x),
        n_fft=1024,
        hop_length=512,
        window=torch.hann_window(1024),
        center=True,
        pad_mode="reflect",
        return_complex=True,
    ).abs()
    assert ours.shape == tuple(ref.shape) == (513, 313)
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-4, atol=1e-4)


def test_utterance_spectrum_matches_torch_fft():
    rng = np.random.default_rng(1)
    x = rng.standard_normal(CFG.window_samples).astype(np.float32) * 0.1
    ref = torch.fft.rfft(torch.from_numpy(x), n=2 * CFG.window_samples).abs()[:80_000]
    np.testing.assert_allclose(utterance_spectrum(x, CFG), ref.numpy(), rtol=1e-3, atol=1e-3)


def test_pure_tone_lands_in_its_bin():
    sr, f0 = CFG.sample_rate, 1000.0  # 1 kHz: STFT bin 64 exactly, spectrum bin 20 000
    t = np.arange(CFG.window_samples) / sr
    x = (0.5 * np.sin(2 * np.pi * f0 * t)).astype(np.float32)
    spec, spectrum = features(x, CFG)
    assert np.all(spec[:, 5:-5].argmax(axis=0) == round(f0 * CFG.n_fft / sr))
    assert spectrum.argmax() == round(f0 * CFG.spectrum_fft_len / sr)
    # Magnitude of a windowed sinusoid: A * sum(hann) / 2 = 0.5 * 512 / 2.
    assert spec[64, 100] == pytest.approx(0.5 * 512 / 2, rel=1e-3)


def test_batch_equals_single():
    rng = np.random.default_rng(2)
    xs = rng.standard_normal((3, CFG.window_samples)).astype(np.float32)
    spec_b, spectrum_b = features(xs, CFG)
    spec_1, spectrum_1 = features(xs[1], CFG)
    np.testing.assert_allclose(spec_b[1], spec_1, rtol=1e-6)
    np.testing.assert_allclose(spectrum_b[1], spectrum_1, rtol=1e-6)


def test_fit_window_tiles_short_and_truncates_long():
    short = np.arange(7, dtype=np.float32)
    np.testing.assert_array_equal(fit_window(short, 10), [0, 1, 2, 3, 4, 5, 6, 0, 1, 2])
    np.testing.assert_array_equal(fit_window(short, 4, offset=5), [5, 6, 0, 1])
    long = np.arange(20, dtype=np.float32)
    np.testing.assert_array_equal(fit_window(long, 5), np.arange(5))
    np.testing.assert_array_equal(fit_window(long, 5, offset=18), [18, 19, 0, 1, 2])
    with pytest.raises(AudioError, match="non-empty mono"):
        fit_window(np.zeros(0, np.float32), 5)


def test_pcm_scaling():
    np.testing.assert_array_equal(
        pcm_to_float(np.array([-32768, 0, 16384], np.int16)), [-1.0, 0.0, 0.5]
    )
    assert pcm_to_float(np.array([2**31 - 1], np.int32))[0] < 1.0
    np.testing.assert_array_equal(pcm_to_float(np.array([0, 128], np.uint8)), [-1.0, 0.0])


def test_wrong_window_length_is_a_clear_error():
    with pytest.raises(AudioError, match="expected 160000"):
        features(np.zeros(1000, np.float32), CFG)


def test_config_round_trip_and_unknown_field():
    c = FrontendConfig(window_s=18.0)
    assert FrontendConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="unknown"):
        FrontendConfig.from_dict({**c.to_dict(), "mel": True})
