"""Data set readers: the real DCASE/MIMII clips, plain folders, and every kind of bad input."""

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from msn_edge.datasets import Clip, describe, load_wave, parse_clip_name, scan
from msn_edge.runtime.errors import AudioError, DatasetError
from msn_edge.runtime.frontend import FrontendConfig

FRONTEND = FrontendConfig()
RATE = FRONTEND.sample_rate


def write_wav(path: Path, seconds: float = 0.1, rate: int = RATE, channels: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    wave = 0.1 * np.random.default_rng(0).standard_normal((int(seconds * rate), channels))
    sf.write(path, wave, rate, subtype="PCM_16")
    return path


# --- real clips ------------------------------------------------------------------------


def test_mimii_fan_dcase2020_layout(shared_data):
    clips = scan(shared_data / "mimii_fan")
    assert Counter((c.split, c.label) for c in clips) == {
        ("train", "normal"): 10,
        ("test", "normal"): 10,
        ("test", "anomaly"): 20,
    }
    assert {(c.layout, c.machine_type, c.machine_id, c.group, c.class_name) for c in clips} == {
        ("dcase2020", "fan", "id_00", "fan/id_00", "fan/id_00")
    }
    assert {c.domain for c in clips} == {"source"} and {c.attributes for c in clips} == {None}
    assert [c.path for c in clips] == sorted(c.path for c in clips)
    assert clips[0].path.name == "anomaly_id_00_00000000.wav"


def test_dcase2020_root_holding_type_folder_and_split_filter(shared_data):
    root = shared_data / "dcase2020_id00"
    assert len(scan(root)) == 76
    train, test = scan(root, "train"), scan(root, "test")
    assert (len(train), len(test)) == (75, 1)
    assert {c.group for c in train} == {"machine/id_00"}
    assert test[0].label == "anomaly" and test[0].split == "test"
    # the <type>/ folder itself is a data set root too
    assert scan(root / "machine", "train") == train


def test_dcase2023_layout_attributes_domains_groups(shared_data):
    clips = scan(shared_data / "dcase2023_dev")
    assert len(clips) == 28 and {c.layout for c in clips} == {"dcase2023"}
    types = {"ToyCar", "ToyTrain", "bearing", "fan", "gearbox", "slider", "valve"}
    assert Counter(c.machine_type for c in clips) == {t: 4 for t in types}
    assert Counter((c.split, c.domain, c.label) for c in clips) == {
        ("train", "source", "normal"): 14,
        ("test", "source", "normal"): 5,
        ("test", "source", "anomaly"): 1,
        ("test", "target", "normal"): 4,
        ("test", "target", "anomaly"): 4,
    }
    assert {c.group for c in clips} == {f"{t}/section_00" for t in types}
    assert {c.section for c in clips} == {"00"} and {c.machine_id for c in clips} == {None}
    train_classes = {c.class_name for c in clips if c.split == "train"}
    assert len(train_classes) == 12
    assert "ToyCar/section_00/car_C2_spd_31V_mic_1" in train_classes
    assert "gearbox/section_00/volt_1.5_wt_0" in train_classes
    assert "fan/section_00/m-n_X" in train_classes
    assert "slider/section_00/vel_500_ac_0.30" in train_classes
    bearing = next(c for c in clips if c.path.name.endswith("0021_vel_8_loc_G.wav"))
    assert (bearing.domain, bearing.label, bearing.attributes) == (
        "target",
        "anomaly",
        "vel_8_loc_G",
    )


def test_scan_one_dcase2023_type_folder(shared_data):
    clips = scan(shared_data / "dcase2023_dev" / "valve", "test")
    assert [(c.machine_type, c.domain, c.label, c.attributes) for c in clips] == [
        ("valve", "target", "anomaly", "pat_03"),
        ("valve", "target", "normal", "pat_03"),
    ]


def test_load_wave_real_clip(shared_data):
    clip = scan(shared_data / "mimii_fan", "train")[0]
    wave = load_wave(clip, FRONTEND)
    assert wave.dtype == np.float32 and wave.shape == (160_000,)
    assert 0 < np.abs(wave).max() < 1
    assert np.array_equal(wave, load_wave(clip.path, FRONTEND))


def test_describe_counts_groups_and_classes(shared_data):
    text = describe(scan(shared_data / "dcase2023_dev"))
    assert text.startswith(
        "layout dcase2023: 28 clips, 7 machine types, 7 scoring groups, 12 training classes"
    )
    row = next(line for line in text.splitlines() if line.startswith("ToyTrain/section_00"))
    # train normal src/tgt, test normal src/tgt, test anomaly src/tgt (empty columns dropped)
    assert row.split()[1:] == ["2", "0", "1", "0", "1"]
    assert "fan/section_00/m-n_X " in text


def test_scan_of_a_folder_of_data_sets_is_an_error(shared_data):
    with pytest.raises(DatasetError, match="no .wav files under"):
        scan(shared_data)


# --- names -----------------------------------------------------------------------------


def test_parse_dcase2023_without_attributes():
    clip = parse_clip_name(Path("section_01_target_test_anomaly_0001.wav"), "fan", "test")
    assert clip == Clip(
        Path("section_01_target_test_anomaly_0001.wav"),
        "fan",
        "test",
        "anomaly",
        "dcase2023",
        section="01",
        domain="target",
        attributes="noAttribute",
    )
    assert clip.group == "fan/section_01" and clip.class_name == "fan/section_01/noAttribute"


@pytest.mark.parametrize(
    "name, split, message",
    [
        ("recording_01.wav", "train", "cannot read the labels"),
        ("normal_id_00.wav", "train", "cannot read the labels"),
        ("section_00_source_train_broken_0001_a_1.wav", "train", "cannot read the labels"),
        ("section_00_source_test_normal_0001_a_1.wav", "train", "the name says test"),
        ("normal_id_00_00000000.flac", "train", "not a .wav file"),
    ],
)
def test_parse_rejects_bad_names(name, split, message):
    with pytest.raises(DatasetError, match=message) as e:
        parse_clip_name(Path(name), "fan", split)
    assert name in str(e.value)


# --- folders ---------------------------------------------------------------------------


def test_unparseable_name_in_dcase_folder_names_the_file(tmp_path):
    write_wav(tmp_path / "fan" / "train" / "normal_id_00_00000000.wav")
    bad = write_wav(tmp_path / "fan" / "train" / "take 3.wav")
    with pytest.raises(DatasetError, match="take 3.wav") as e:
        scan(tmp_path)
    assert str(bad) in str(e.value)


def test_mixed_layouts_are_errors(tmp_path):
    write_wav(tmp_path / "a" / "fan" / "train" / "normal_id_00_00000000.wav")
    write_wav(tmp_path / "a" / "valve" / "train" / "section_00_source_train_normal_0000_x_1.wav")
    with pytest.raises(DatasetError, match="mixes layouts"):
        scan(tmp_path / "a")
    write_wav(tmp_path / "b" / "fan" / "train" / "normal_id_00_00000000.wav")
    write_wav(tmp_path / "b" / "pump" / "clip.wav")
    with pytest.raises(DatasetError, match="mixes DCASE machine folders"):
        scan(tmp_path / "b")


def test_plain_folder_one_class_per_subfolder(tmp_path):
    for name in ("a.wav", "b.WAV", "._a.wav", "notes.txt"):
        (write_wav if name.lower().endswith("wav") else Path.touch)(tmp_path / "fanA" / name)
    write_wav(tmp_path / "fanB" / "x.wav")
    (tmp_path / "empty").mkdir()
    clips = scan(tmp_path)
    assert [(c.path.name, c.class_name, c.group, c.split, c.label, c.layout) for c in clips] == [
        ("a.wav", "fanA", "fanA", "train", "normal", "plain"),
        ("b.WAV", "fanA", "fanA", "train", "normal", "plain"),
        ("x.wav", "fanB", "fanB", "train", "normal", "plain"),
    ]
    with pytest.raises(DatasetError, match="no test clips under"):
        scan(tmp_path, "test")


def test_plain_folder_of_wavs_is_one_class(tmp_path):
    write_wav(tmp_path / "pump7" / "0001.wav")
    clips = scan(tmp_path / "pump7")
    assert [c.class_name for c in clips] == ["pump7"]
    write_wav(tmp_path / "pump7" / "sub" / "0002.wav")
    with pytest.raises(DatasetError, match="own sub-folder"):
        scan(tmp_path / "pump7")


def test_a_split_folder_is_not_a_plain_class(shared_data):
    with pytest.raises(DatasetError, match="looks like the test/ folder of a DCASE machine"):
        scan(shared_data / "mimii_fan" / "fan" / "test")


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(DatasetError, match="no such folder"):
        scan(tmp_path / "nope")
    with pytest.raises(DatasetError, match=f"no .wav files under {tmp_path}"):
        scan(tmp_path)
    (tmp_path / "fan" / "train").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no .wav files under"):
        scan(tmp_path)
    write_wav(tmp_path / "fan" / "train" / "normal_id_00_00000000.wav")
    with pytest.raises(DatasetError, match="no test clips under"):
        scan(tmp_path, "test")


# --- audio -----------------------------------------------------------------------------


def test_load_wave_wrong_rate_and_channels(tmp_path):
    with pytest.raises(AudioError, match="sample rate 8000 Hz, expected 16000") as e:
        load_wave(write_wav(tmp_path / "slow.wav", rate=8000), FRONTEND)
    assert "slow.wav" in str(e.value)
    with pytest.raises(AudioError, match="2 channels, expected mono"):
        load_wave(write_wav(tmp_path / "stereo.wav", channels=2), FRONTEND)


@pytest.mark.parametrize("content", ["empty", "garbage", "header_only", "truncated_header"])
def test_load_wave_broken_files(tmp_path, content):
    good = write_wav(tmp_path / "good.wav").read_bytes()
    data = {
        "empty": b"",
        "garbage": bytes(np.random.default_rng(1).integers(0, 256, 4000, dtype=np.uint8)),
        "header_only": good[:44],  # a valid header announcing no sample data
        "truncated_header": good[:20],
    }[content]
    path = tmp_path / "normal_id_00_00000000.wav"
    path.write_bytes(data)
    with pytest.raises(AudioError) as e:
        load_wave(path, FRONTEND)
    assert str(path) in str(e.value)


# --- CLI -------------------------------------------------------------------------------


def test_cli_datasets_prints_the_table(shared_data):
    from click.testing import CliRunner

    from msn_edge.cli import main

    result = CliRunner().invoke(main, ["datasets", str(shared_data / "mimii_fan"), "--check"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert (
        lines[0]
        == "layout dcase2020: 40 clips, 1 machine types, 1 scoring groups, 1 training classes"
    )
    assert lines[3].split() == ["fan/id_00", "10", "10", "20"]
    assert lines[-1] == "decoded 40 clips: none unreadable"
    assert "Example:" in CliRunner().invoke(main, ["datasets", "-h"]).stdout


def test_cli_datasets_bad_input_is_one_line_and_exit_1(tmp_path):
    from click.testing import CliRunner

    from msn_edge.cli import main

    result = CliRunner().invoke(main, ["datasets", str(tmp_path / "nope")])
    assert result.exit_code == 1
    assert result.stderr == f"Error: {tmp_path / 'nope'}: no such folder\n"

    write_wav(tmp_path / "fan" / "train" / "normal_id_00_00000000.wav")
    bad = write_wav(tmp_path / "fan" / "train" / "normal_id_00_00000001.wav", rate=44_100)
    result = CliRunner().invoke(main, ["datasets", str(tmp_path), "--check"])
    assert result.exit_code == 1
    assert f"Error: {bad}: sample rate 44100 Hz, expected 16000 Hz" in result.stderr
    assert result.stdout.splitlines()[-1] == "decoded 2 clips: 1 unreadable"
