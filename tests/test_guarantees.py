"""docs/guarantees.md, case by case: no wrong verdict, no traceback, nothing lost."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner
from toy_bundle import anomalous_signal, make_toy_bundle, normal_signal, toy_frontend

from msn_edge.cli import main
from msn_edge.runtime import bundle as bundle_mod
from msn_edge.runtime import bundle_zip
from msn_edge.runtime.audio import read_audio, read_clip, unjudgeable
from msn_edge.runtime.bundle import read_bundle
from msn_edge.runtime.errors import AudioError, BundleError, MsnEdgeError
from msn_edge.runtime.events import EventSink
from msn_edge.runtime.manifest import manifest_digest
from msn_edge.runtime.sources import RawPcmSource, open_input

RATE = 16_000
SUBTYPES = ["PCM_16", "PCM_24", "PCM_32", "FLOAT", "FLAC"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return make_toy_bundle(tmp_path_factory.mktemp("bundle") / "toy.msn")


def _clip(kind: str = "n", seed: int = 1, seconds: int = 1) -> np.ndarray:
    """A toy clip quantised to int16 values, so every file format holds it exactly."""
    rng = np.random.default_rng(seed)
    make = {"n": normal_signal, "a": anomalous_signal}[kind]
    wave = np.concatenate([make(toy_frontend(), rng) for _ in range(seconds)])
    return np.round(np.clip(wave, -1, 32767 / 32768) * 32768).astype(np.int16)


def _write(path: Path, pcm16: np.ndarray, subtype: str) -> Path:
    if subtype == "FLAC":
        sf.write(path, pcm16, RATE, subtype="PCM_16", format="FLAC")
    else:
        sf.write(path, pcm16.astype(np.float32) / 32768.0, RATE, subtype=subtype, format="WAV")
    return path


def cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exc_info
    return result.exit_code, result.stdout, result.stderr


# --- 1. One reader: int16, int24, int32, float and FLAC mean the same samples everywhere


def test_every_pcm_format_scores_the_same_in_score_and_monitor(toy, tmp_path):
    pcm = _clip("a", seconds=2)
    scores = {}
    for subtype in SUBTYPES:
        path = _write(
            tmp_path / f"clip_{subtype}.{'flac' if subtype == 'FLAC' else 'wav'}", pcm, subtype
        )
        code, out, _ = cli("score", str(toy), str(path), "--json")
        assert code == 0
        doc = json.loads(out)
        code, out, _ = cli("monitor", str(toy), "--input", str(path), "--alarm-after", "0")
        assert code == 0
        events = [json.loads(line) for line in out.splitlines()]
        scores[subtype] = (doc["score"], max(e["score"] for e in events))
        assert doc["windows"] == len(events) == 2
    first = scores["PCM_16"]
    for subtype, pair in scores.items():
        assert pair == pytest.approx(first, abs=1e-6), subtype
    assert first[0] == pytest.approx(first[1], abs=1e-6)  # score's worst window = monitor's
    assert doc["verdict"] == "anomalous"


# --- 2. Audio that cannot be judged is "invalid", never "normal"


@pytest.mark.parametrize(
    ("fill", "reason"),
    [(np.nan, "non-finite samples"), (np.inf, "non-finite samples"), (0.0, "digital silence")],
)
def test_unjudgeable_file_is_invalid_with_a_reason_and_valid_json(toy, tmp_path, fill, reason):
    wave = np.full(RATE, fill, dtype=np.float32)
    good = _write(tmp_path / "good.wav", _clip(), "PCM_16")
    sf.write(tmp_path / "bad.wav", wave, RATE, subtype="FLOAT")
    code, out, err = cli("score", str(toy), str(tmp_path / "bad.wav"), str(good), "--json")
    assert code == 1  # an invalid file is not a success
    bad_doc, good_doc = (json.loads(line) for line in out.splitlines())  # strict JSON, no NaN
    assert bad_doc["verdict"] == "invalid" and bad_doc["score"] is None
    assert reason in bad_doc["invalid_reason"] and reason in err
    assert good_doc["verdict"] == "normal"


def test_monitor_marks_nan_and_silent_windows_invalid_and_they_raise_no_alarm(toy, tmp_path):
    pcm = _clip(seconds=3).astype(np.float32) / 32768
    pcm[RATE : RATE + 10] = np.nan
    pcm[2 * RATE :] = 0.0
    sf.write(tmp_path / "mixed.wav", pcm, RATE, subtype="FLOAT")
    code, out, err = cli(
        "monitor", str(toy), "--input", str(tmp_path / "mixed.wav"), "--alarm-after", "1"
    )
    assert code == 0
    events = [json.loads(line) for line in out.splitlines()]
    assert [e["verdict"] for e in events] == ["normal", "invalid", "invalid"]
    assert events[1]["score"] is None and events[1]["anomalous"] is None
    assert "non-finite" in events[1]["invalid_reason"]
    assert "digital silence" in events[2]["invalid_reason"]
    assert "2 invalid" in err


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_threshold_hop_duration_refuse_non_finite_values(toy, value):
    code, _, err = cli("monitor", str(toy), "--input", "-", "--threshold", "3")
    assert code == 2 and "Invalid value for '--threshold'" in err  # scores lie in [0, 2]
    for option in ("--threshold", "--hop", "--duration"):
        code, _, err = cli("monitor", str(toy), "--input", "-", option, value)
        assert code == 2, (option, value)
        assert f"Invalid value for '{option}'" in err and "Traceback" not in err


# --- 3. One NaN clip never poisons training silently


def test_nan_clip_is_rejected_by_the_data_check_and_by_loading(tmp_path):
    folder = tmp_path / "data" / "fan" / "train"
    folder.mkdir(parents=True)
    sf.write(folder / "normal_id_00_00000000.wav", _clip(), RATE, subtype="PCM_16")
    bad = np.ones(RATE, dtype=np.float32) * 0.1
    bad[5] = np.nan
    sf.write(folder / "normal_id_00_00000001.wav", bad, RATE, subtype="FLOAT")
    code, out, err = cli("datasets", str(tmp_path / "data"), "--check")
    assert code == 1
    assert "normal_id_00_00000001.wav: unusable clip: non-finite samples" in err
    assert "1 unreadable" in out
    with pytest.raises(AudioError, match="unusable clip"):
        read_clip(folder / "normal_id_00_00000001.wav", RATE)


def test_data_errors_suggest_no_option_the_command_lacks(tmp_path):
    sf.write(tmp_path / "stereo.wav", np.zeros((100, 2), np.float32) + 0.1, 8000)
    with pytest.raises(AudioError) as err:
        read_clip(tmp_path / "stereo.wav", RATE)
    assert "--downmix" not in str(err.value) and "sox" in str(err.value)
    with pytest.raises(AudioError, match="pass --downmix"):
        read_audio(tmp_path / "stereo.wav", RATE, flags=True)


# --- 4. Bundle integrity


def test_bundle_size_cap_and_ratio_are_checked_before_inflating(toy, tmp_path, monkeypatch):
    with zipfile.ZipFile(toy) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    manifest = json.loads(members.pop("manifest.json"))
    bomb = b"\0" * (3 << 20)  # inflates ~1000x
    members["model.onnx"] = bomb
    manifest["members"]["model.onnx"] = {
        "sha256": __import__("hashlib").sha256(bomb).hexdigest(),
        "bytes": len(bomb),
    }
    manifest["digest_sha256"] = manifest_digest(manifest)
    path = tmp_path / "bomb.msn"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("manifest.json", json.dumps(manifest))
        for n, d in members.items():
            zf.writestr(n, d)
    assert path.stat().st_size < 64 << 10
    with pytest.raises(BundleError, match=r"would inflate \d+x .*decompression bomb"):
        read_bundle(path)
    monkeypatch.setattr(bundle_zip, "MAX_BUNDLE_BYTES", 1000)
    with pytest.raises(BundleError, match="over the bundle limit of 1000 bytes"):
        read_bundle(toy)


def _forged(toy: Path, tmp_path: Path, edit) -> Path:
    with zipfile.ZipFile(toy) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    manifest = json.loads(members["manifest.json"])
    edit(manifest)
    manifest["digest_sha256"] = manifest_digest(manifest)
    members["manifest.json"] = json.dumps(manifest).encode()
    out = tmp_path / "forged.msn"
    with zipfile.ZipFile(out, "w") as zf:
        for n, d in members.items():
            zf.writestr(n, d)
    return out


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda m: m["groups"][0].update(name=["a"]),
            r"groups\[0\]\.name must be a non-empty string",
        ),
        (lambda m: m["groups"][0].update(start=1e300), r"groups\[0\]\.start must be an integer"),
        (lambda m: m["frontend"].update(hop=0), r"frontend\.hop must be an integer in \[1, "),
        (
            lambda m: m["frontend"].update(window_s=0),
            r"frontend\.window_s must be a finite number in \(0",
        ),
        (lambda m: m["frontend"].update(window_s=1e6), r"frontend\.window_s must be a finite"),
        (lambda m: m.update(embedding_dim="32"), r"embedding_dim must be an integer"),
        (
            lambda m: m.update(default_group="nope"),
            r"default_group must be the name of a listed group",
        ),
        (lambda m: m.update(members=[]), r"manifest field members must be a JSON object"),
    ],
)
def test_malformed_manifest_fields_are_one_clear_error(toy, tmp_path, edit, message):
    with pytest.raises(BundleError, match=message):
        read_bundle(_forged(toy, tmp_path, edit))


def test_start_1e400_and_deep_nesting_are_clear_errors(toy, tmp_path):
    with zipfile.ZipFile(toy) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    for text, message in [
        (
            members["manifest.json"].replace(b'"start": 0', b'"start": 1e400'),
            "JSON cannot write|must be",
        ),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply|nested more than"),
    ]:
        out = tmp_path / "x.msn"
        with zipfile.ZipFile(out, "w") as zf:
            for n, d in {**members, "manifest.json": text}.items():
                zf.writestr(n, d)
        with pytest.raises(BundleError, match=message):
            read_bundle(out)


def test_npy_header_claiming_46_tib_is_refused_without_allocating(toy, tmp_path):
    buf = io.BytesIO()
    header = {"descr": "<f4", "fortran_order": False, "shape": (1 << 40, 12)}
    np.lib.format.write_array_header_1_0(buf, header)
    forged = buf.getvalue() + b"\0" * 64
    import hashlib

    def edit(m):
        m["members"]["prototypes.npy"] = {
            "sha256": hashlib.sha256(forged).hexdigest(),
            "bytes": len(forged),
        }

    path = _forged(toy, tmp_path, edit)
    with zipfile.ZipFile(path) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    members["prototypes.npy"] = forged
    with zipfile.ZipFile(path, "w") as zf:
        for n, d in members.items():
            zf.writestr(n, d)
    with pytest.raises(BundleError, match=r"claims shape \(1099511627776, 12\) but holds 64 bytes"):
        read_bundle(path)


def test_pack_bundle_keeps_extra_manifest_records(toy, tmp_path):
    b = read_bundle(toy)
    with zipfile.ZipFile(toy) as zf:
        members = {n: zf.read(n) for n in zf.namelist() if n != "manifest.json"}
    manifest = {**b.manifest, "enrollments": [{"group": "new", "n_clips": 3}]}
    out = bundle_mod.pack_bundle(tmp_path / "enrolled.msn", manifest, members)
    again = read_bundle(out)
    assert again.manifest["enrollments"] == [{"group": "new", "n_clips": 3}]
    assert again.manifest["digest_sha256"] == manifest_digest(again.manifest)


# --- 5. Outputs never crash and never lose events


class _Broken(io.StringIO):
    def write(self, s):
        raise BrokenPipeError(32, "Broken pipe")


class _Full(io.StringIO):
    def write(self, s):
        raise OSError(28, "No space left on device")


def test_events_file_keeps_every_event_when_stdout_goes_away(tmp_path):
    sink = EventSink(stream=_Broken(), events_file=tmp_path / "events.jsonl")
    for k in range(6):
        sink({"event": "window", "index": k, "score": float("nan")})
    sink.close()
    lines = (tmp_path / "events.jsonl").read_text().splitlines()
    assert [json.loads(line)["index"] for line in lines] == list(range(6))
    assert json.loads(lines[0])["score"] is None  # NaN never reaches JSON
    assert sink.stream_failures == 6


def test_full_stdout_without_events_file_and_full_events_file_are_clear_errors(tmp_path):
    with pytest.raises(MsnEdgeError, match="cannot write events to stdout .No space left"):
        EventSink(stream=_Full())({"event": "window"})
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this system")
    sink = EventSink(stream=io.StringIO(), events_file="/dev/full")
    with pytest.raises(MsnEdgeError, match="/dev/full: cannot write the events file"):
        sink({"event": "window"})


def _run_cli(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "msn_edge.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        **kw,
    )


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full on this system")
def test_score_to_a_full_disk_is_one_line_not_a_traceback(toy, tmp_path):
    clip = _write(tmp_path / "a.wav", _clip(), "PCM_16")
    with open("/dev/full", "w") as full:
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                "from msn_edge.cli import main; main()",
                "score",
                str(toy),
                str(clip),
            ],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    assert proc.returncode == 1
    assert "cannot write results to stdout (No space left on device)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_monitor_piped_to_head_keeps_writing_the_events_file(toy, tmp_path):
    clip = _write(tmp_path / "six.wav", _clip(seconds=6), "PCM_16")
    events = tmp_path / "events.jsonl"
    cmd = (
        f"{sys.executable} -c 'from msn_edge.cli import main; main()' monitor {toy} "
        f"--input {clip} --events-file {events} --alarm-after 0 | head -1"
    )
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120)
    assert len(proc.stdout.splitlines()) == 1
    assert len(events.read_text().splitlines()) == 6
    assert "Traceback" not in proc.stderr


# --- 6. Silent partial results are gone


def test_truncated_wav_is_an_error_not_a_tiled_clip(toy, tmp_path):
    path = _write(tmp_path / "cut.wav", _clip(seconds=2), "PCM_16")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    code, _, err = cli("score", str(toy), str(path))
    assert code == 1 and "truncated: the header declares 64000 bytes of audio" in err


def test_long_file_is_judged_on_every_window_and_the_partial_end_too(toy, tmp_path):
    pcm = np.concatenate([_clip("n", seconds=3), _clip("a", seed=9)[: RATE // 2]])
    path = _write(tmp_path / "long.wav", pcm, "PCM_16")  # 3.5 s; the whine is in the last 0.5 s
    code, out, err = cli("score", str(toy), str(path), "--json")
    doc = json.loads(out)
    assert doc["windows"] == 4 and doc["worst_start_s"] == 2.5  # end-aligned last window
    assert doc["verdict"] == "anomalous"
    assert "4 windows over 3.5 s, worst at 2.5 s" in err


def test_monitor_says_how_much_of_the_end_was_not_scored(toy, tmp_path):
    path = _write(tmp_path / "tail.wav", _clip(seconds=2)[: RATE + 4000], "PCM_16")
    code, out, err = cli("monitor", str(toy), "--input", str(path))
    assert code == 0 and len(out.splitlines()) == 1
    assert "the last 0.250 s (4000 samples) made no complete window" in err
    assert "4000 samples in no window" in err


@pytest.mark.parametrize("subtype", ["PCM_16", "PCM_24", "FLOAT"])
def test_wav_piped_to_stdin_is_parsed_not_read_as_samples(tmp_path, subtype):
    pcm = _clip()
    buf = io.BytesIO()
    sf.write(buf, pcm.astype(np.float32) / 32768, RATE, subtype=subtype, format="WAV")
    source = RawPcmSource(io.BytesIO(buf.getvalue()), RATE)
    got = []
    while (chunk := source.read()) is not None:
        got.append(
            chunk.samples.astype(np.float32) / (32768 if chunk.samples.dtype == np.int16 else 1)
        )
    np.testing.assert_array_equal(np.concatenate(got), pcm.astype(np.float32) / 32768)


def test_fifo_and_dev_zero_are_streams_not_missing_files(toy, tmp_path):
    fifo = tmp_path / "audio.fifo"
    os.mkfifo(fifo)
    writer = subprocess.Popen(["bash", "-c", f"head -c {2 * RATE} /dev/zero > {fifo}"])
    with open_input(str(fifo), RATE) as source:
        total = 0
        while (chunk := source.read()) is not None:
            total += chunk.samples.size
    writer.wait(timeout=30)
    assert total == RATE
    code, out, _ = cli("monitor", str(toy), "--input", "/dev/zero", "--max-windows", "2")
    assert code == 0
    assert [json.loads(line)["verdict"] for line in out.splitlines()] == ["invalid", "invalid"]


# --- 7. Others


def test_resample_of_a_one_sample_file_does_not_stop_the_batch(toy, tmp_path):
    sf.write(tmp_path / "one.wav", np.array([0.1], np.float32), 44_100)
    good = _write(tmp_path / "good.wav", _clip(), "PCM_16")
    code, out, err = cli("score", str(toy), str(tmp_path / "one.wav"), str(good), "--resample")
    assert code == 1
    assert "one.wav: 1 sample(s) at 44100 Hz is too short to resample" in err
    assert out.startswith(f"{good}\t")


def test_plot_of_a_binary_file_is_a_clear_error(tmp_path):
    (tmp_path / "x.bin").write_bytes(bytes(range(256)) * 4)
    code, _, err = cli("plot", str(tmp_path / "x.bin"), "-o", str(tmp_path / "p.png"))
    assert code == 1 and "not a monitor events file (not UTF-8 text)" in err


def test_unjudgeable_policy():
    assert unjudgeable(np.zeros(10, np.float32)).startswith("digital silence")
    assert unjudgeable(np.full(10, 1e-6, np.float32)).startswith("digital silence")
    assert unjudgeable(np.full(10, 1e-4, np.float32)) is None  # quiet, judged, flagged silent
    assert unjudgeable(np.array([0.1, np.nan], np.float32)).startswith("non-finite samples")
    assert unjudgeable(np.ones(10, np.float32)) is None  # clipped: judged, flagged clipped


def test_manifest_window_that_does_not_fit_the_model_fails_at_open(toy, tmp_path):
    from msn_edge.runtime.detector import Detector

    forged = _forged(toy, tmp_path, lambda m: m["frontend"].update(window_s=1.8))
    with pytest.raises(
        BundleError, match=r"the model takes a spectrogram of shape .*window 1\.8 s"
    ):
        Detector.open(forged)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_tampered_checkpoint_error_never_suggests_weights_only_false(tmp_path):
    torch = pytest.importorskip("torch")
    from msn_edge.checkpoint import CheckpointError, read_checkpoint

    path = tmp_path / "evil.pt"
    torch.save({"format": 1, "x": _Evil()}, path)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(path)
    assert "weights_only" not in str(err.value)
    assert "objects other than tensors and plain values" in str(err.value)


def test_export_refuses_to_overwrite_the_checkpoint_or_other_files(tmp_path):
    from msn_edge.export.pack import refuse_overwrite

    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"PK weights")
    with pytest.raises(MsnEdgeError, match="is the run's checkpoint"):
        refuse_overwrite(run, run / "checkpoint.pt")
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(MsnEdgeError, match="exists and is not a bundle; refusing to overwrite"):
        refuse_overwrite(run, tmp_path / "notes.txt")
    refuse_overwrite(run, tmp_path / "new.msn")  # a new file is fine
    code, _, err = cli("export", str(run), "-o", str(run / "checkpoint.pt"))
    assert code == 1 and "is the run's checkpoint" in err
    assert (run / "checkpoint.pt").read_bytes() == b"PK weights"
