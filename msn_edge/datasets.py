"""Data set readers: DCASE 2020 / 2023 folder layouts and plain folders of normal clips.

The labels live in the file names (spec §6), so scanning a data set reads names only;
audio is decoded when a clip is loaded. numpy/soundfile only (no torch), so the runtime
and the edge tools may use it too.

Layouts (detected, never configured):
- DCASE 2020: `<type>/train/normal_id_XX_NNNNNNNN.wav`,
  `<type>/test/{normal|anomaly}_id_XX_NNNNNNNN.wav`.
- DCASE 2023: `<type>/{train,test}/section_XX_{source|target}_{train|test}_{normal|anomaly}_
  NNNN_<attrs>.wav` (attributes may be missing: "noAttribute").
- plain: `root/<name>/*.wav` (one class per sub-folder), or `root/*.wav` (one class named
  after root); every clip is a normal training clip.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from msn_edge.runtime.audio import read_clip
from msn_edge.runtime.errors import DatasetError
from msn_edge.runtime.frontend import FrontendConfig

SPLITS = ("train", "test")
NO_ATTRIBUTE = "noAttribute"  # DCASE 2024's name for a clip without attributes

_DCASE2020 = re.compile(r"(?P<label>normal|anomaly)_id_(?P<id>\d+)_\d+")
_DCASE2023 = re.compile(
    r"section_(?P<section>\d+)_(?P<domain>source|target)_(?P<split>train|test)_"
    r"(?P<label>normal|anomaly)_\d+(?:_(?P<attrs>.+))?"
)
_EXPECTED_NAMES = (
    "expected normal_id_XX_NNNNNNNN.wav (DCASE 2020) or "
    "section_XX_{source|target}_{train|test}_{normal|anomaly}_NNNN[_attrs].wav (DCASE 2023)"
)
_EXPECTED_FOLDERS = "<type>/train/*.wav and <type>/test/*.wav, or <class>/*.wav"


@dataclass(frozen=True)
class Clip:
    """One audio file and the labels its name and folder carry."""

    path: Path
    machine_type: str
    split: str  # "train" | "test"
    label: str  # "normal" | "anomaly"
    layout: str  # "dcase2020" | "dcase2023" | "plain"
    machine_id: str | None = None  # "id_00" (DCASE 2020)
    section: str | None = None  # "00" (DCASE 2023)
    domain: str = "source"  # "source" | "target" (DCASE 2023)
    attributes: str | None = None  # "vel_8_loc_B" (DCASE 2023)

    @property
    def group(self) -> str:
        """Scoring group: one set of prototypes and one threshold (spec §4)."""
        if self.machine_id is not None:
            return f"{self.machine_type}/{self.machine_id}"
        if self.section is not None:
            return f"{self.machine_type}/section_{self.section}"
        return self.machine_type

    @property
    def class_name(self) -> str:
        """Auxiliary training class (spec §3): type × ID, or type × section × attributes."""
        if self.layout == "dcase2023":
            return f"{self.group}/{self.attributes}"
        return self.group


def parse_clip_name(path: Path, machine_type: str, split: str) -> Clip:
    """Labels of a DCASE 2020 or 2023 file from its name; DatasetError naming the file if not."""
    path = Path(path)
    if path.suffix.lower() != ".wav":
        raise DatasetError(f"{path}: not a .wav file")
    stem = path.stem
    if m := _DCASE2020.fullmatch(stem):
        return Clip(path, machine_type, split, m["label"], "dcase2020", machine_id=f"id_{m['id']}")
    if m := _DCASE2023.fullmatch(stem):
        if m["split"] != split:
            raise DatasetError(f"{path}: the name says {m['split']} but the file is in {split}/")
        return Clip(
            path,
            machine_type,
            split,
            m["label"],
            "dcase2023",
            section=m["section"],
            domain=m["domain"],
            attributes=m["attrs"] or NO_ATTRIBUTE,
        )
    raise DatasetError(f"{path}: cannot read the labels from the file name; {_EXPECTED_NAMES}")


def scan(root: str | Path, split: str | None = None) -> list[Clip]:
    """Every clip of a data set, sorted by path; `split` keeps only "train" or "test".

    `root` holds `<type>/` folders, or is one `<type>/` folder, or is a plain folder of
    normal clips. A layout that cannot be read is a DatasetError that names the folder or
    file, before any audio is decoded.
    """
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such folder")
    if _is_type_dir(root):
        clips = _scan_type(root, split)
    else:
        type_dirs = [d for d in _subdirs(root) if _is_type_dir(d)]
        plain_dirs = [d for d in _subdirs(root) if not _is_type_dir(d) and _wavs(d)]
        if type_dirs and (plain_dirs or _wavs(root)):
            raise DatasetError(
                f"{root}: mixes DCASE machine folders ({type_dirs[0].name}/train, ...) with "
                f"plain folders of .wav files ({(plain_dirs or [root])[0].name}); "
                "use one layout per data set"
            )
        if type_dirs:
            clips = [c for d in type_dirs for c in _scan_type(d, split)]
        else:
            clips = _scan_plain(root, plain_dirs)
            if split is not None:
                clips = [c for c in clips if c.split == split]
    if not clips:
        what = f"{split} clips" if split else ".wav files"
        raise DatasetError(f"no {what} under {root} (expected {_EXPECTED_FOLDERS})")
    layouts = {c.layout for c in clips}
    if len(layouts) > 1:
        raise DatasetError(f"{root}: mixes layouts {sorted(layouts)}; use one layout per data set")
    return sorted(clips, key=lambda c: str(c.path))


def load_wave(clip_or_path: Clip | str | Path, frontend: FrontendConfig) -> np.ndarray:
    """A clip as float32 mono at the front-end's rate; AudioError naming the file if not.

    Non-finite samples are an error here (runtime.audio.read_clip): one NaN clip would
    poison training, thresholds and metrics.
    """
    path = clip_or_path.path if isinstance(clip_or_path, Clip) else clip_or_path
    return read_clip(path, frontend.sample_rate)


def describe(clips: Sequence[Clip]) -> str:
    """A plain-text table of clip counts per scoring group and per training class.

    What a user checks before training: which layout was detected, how many clips each
    group has per split / label / domain, and which auxiliary classes training will see.
    """
    layouts = sorted({c.layout for c in clips})
    types = sorted({c.machine_type for c in clips})
    groups = sorted({c.group for c in clips})
    train_classes = Counter(c.class_name for c in clips if c.split == "train")
    lines = [
        f"layout {', '.join(layouts)}: {len(clips)} clips, {len(types)} machine types, "
        f"{len(groups)} scoring groups, {len(train_classes)} training classes",
        "",
    ]
    domains = ("source", "target") if any(c.domain == "target" for c in clips) else ("source",)
    columns = [
        (split, label, domain)
        for split in SPLITS
        for label in ("normal", "anomaly")
        for domain in domains
    ]
    counts = Counter((c.group, c.split, c.label, c.domain) for c in clips)
    columns = [col for col in columns if any(counts[(g, *col)] for g in groups)]
    short = {"source": "src", "target": "tgt"}
    header = ["group"] + [
        f"{sp} {lab} {short[d]}" if len(domains) > 1 else f"{sp} {lab}" for sp, lab, d in columns
    ]
    rows = [[g] + [str(counts[(g, *col)]) for col in columns] for g in groups]
    class_rows = [[name, str(n)] for name, n in sorted(train_classes.items())]
    lines += _table(header, rows)
    if class_rows:
        lines += ["", *_table(["training class", "clips"], class_rows)]
    return "\n".join(lines) + "\n"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Left-aligned first column, right-aligned numbers."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in [header, *rows]
    ]


def _subdirs(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _wavs(folder: Path) -> list[Path]:
    """The .wav files directly in `folder`; hidden files (macOS `._x.wav`) are not audio."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() == ".wav" and not p.name.startswith(".") and p.is_file()
    )


def _is_type_dir(folder: Path) -> bool:
    return any((folder / s).is_dir() for s in SPLITS)


def _scan_type(type_dir: Path, split: str | None) -> list[Clip]:
    """One DCASE `<type>/` folder: parse every name in its train/ and test/ folders."""
    machine_type = type_dir.resolve().name
    clips = [
        parse_clip_name(p, machine_type, s)
        for s in SPLITS
        if split in (None, s) and (type_dir / s).is_dir()
        for p in _wavs(type_dir / s)
    ]
    layouts = {c.layout for c in clips}
    if len(layouts) > 1:
        raise DatasetError(f"{type_dir}: mixes layouts {sorted(layouts)} in one machine folder")
    return clips


def _scan_plain(root: Path, class_dirs: list[Path]) -> list[Clip]:
    """A folder of normal clips: one class per sub-folder, or root itself as one class."""
    top = _wavs(root)
    if top and root.resolve().name in SPLITS:
        # Taking DCASE test clips (anomalies included) for normal training clips is the
        # one mistake this layout could make silently.
        raise DatasetError(
            f"{root}: looks like the {root.resolve().name}/ folder of a DCASE machine folder; "
            f"pass the data set root or {root.resolve().parent} instead"
        )
    if top and class_dirs:
        raise DatasetError(
            f"{root}: holds .wav files and sub-folders of .wav files ({class_dirs[0].name}/); "
            "put each class in its own sub-folder"
        )
    if top:
        return [Clip(p, root.resolve().name, "train", "normal", "plain") for p in top]
    return [Clip(p, d.name, "train", "normal", "plain") for d in class_dirs for p in _wavs(d)]
