"""Install extras: one ONNX Runtime per environment, version floors, and what the runtime
says when there is none, or two.

Both onnxruntime and onnxruntime-gpu install the module `onnxruntime`; with both present
the GPU providers vanish and the GPU tests skip instead of failing. So: no combination of
extras may bring both, and this environment must hold exactly one.
"""

from __future__ import annotations

import configparser
import importlib.metadata
import itertools
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from toy_bundle import make_toy_bundle, normal_signal

from msn_edge.runtime import ort_install
from msn_edge.runtime.bundle import read_bundle

ROOT = Path(__file__).resolve().parents[1]
ORT_CPU, ORT_GPU = "onnxruntime", "onnxruntime-gpu"
BASE = ""  # the requirements of a plain `pip install msn-edge`


def _from_metadata() -> dict[str, list[Requirement]]:
    """Extra -> requirements, as the installed package's metadata declares them."""
    dist = importlib.metadata.distribution("msn-edge")
    extras = {BASE: [], **{e: [] for e in dist.metadata.get_all("Provides-Extra") or []}}
    for text in dist.requires or []:
        req = Requirement(text)
        owner = [e for e in extras if e and req.marker and req.marker.evaluate({"extra": e})]
        if req.marker is None or "extra" not in str(req.marker):  # base, maybe per Python
            extras[BASE].append(req)
        for e in owner:
            extras[e].append(Requirement(f"{req.name}{req.specifier}"))
    return extras


def _from_setup_cfg() -> dict[str, list[Requirement]]:
    """Extra -> requirements, as setup.cfg (the source) declares them."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")

    def reqs(text: str) -> list[Requirement]:
        return [Requirement(line) for line in text.split("\n") if line.strip()]

    extras = {BASE: reqs(cfg["options"]["install_requires"])}
    extras.update({e: reqs(v) for e, v in cfg["options.extras_require"].items()})
    return extras


SOURCES = {"installed metadata": _from_metadata, "setup.cfg": _from_setup_cfg}


def _names(reqs) -> set[str]:
    return {canonicalize_name(r.name) for r in reqs}


RUNTIME_EXTRAS = ("cpu", "gpu")  # alternatives: `pip install msn-edge[cpu]` or `[gpu]`


@pytest.mark.parametrize("source", SOURCES)
def test_no_combination_of_extras_brings_both_onnx_runtimes(source):
    """Every combination of extras with at most one runtime choice (cpu or gpu) - that is,
    everything a user can ask for short of naming both alternatives - brings at most one
    ONNX Runtime; naming both is refused at run time (ort_install.conflict)."""
    extras = SOURCES[source]()
    others = sorted(e for e in extras if e and e not in RUNTIME_EXTRAS)
    assert {"tensorrt", "jetson", "train", "export", "plot", "dev"} <= set(others)
    checked = 0
    for runtime in ((), *((e,) for e in RUNTIME_EXTRAS)):
        for n in range(len(others) + 1):
            for combo in itertools.combinations(others, n):
                chosen = (*runtime, *combo)
                names = _names(extras[BASE]).union(*(_names(extras[e]) for e in chosen))
                assert not {ORT_CPU, ORT_GPU} <= names, f"msn-edge[{','.join(chosen)}]"
                checked += 1
    assert checked == 3 * 2 ** len(others)


@pytest.mark.parametrize("source", SOURCES)
def test_only_the_runtime_extras_bring_an_onnx_runtime(source):
    extras = SOURCES[source]()
    brings = {e: _names(reqs) & {ORT_CPU, ORT_GPU} for e, reqs in extras.items()}
    assert brings.pop("cpu") == {ORT_CPU}
    assert brings.pop("gpu") == {ORT_GPU}
    assert all(not found for found in brings.values()), brings  # base and the others: none


def test_installed_metadata_is_setup_cfg():
    """A stale editable install would make the metadata checks above meaningless."""
    installed, source = _from_metadata(), _from_setup_cfg()
    assert set(installed) == set(source), "setup.cfg changed: run scripts/setup.sh"
    for extra, reqs in source.items():
        assert {str(r) for r in installed[extra]} == {str(r) for r in reqs}, extra


def _specifier(extras, extra: str, name: str):
    (req,) = [r for r in extras[extra] if canonicalize_name(r.name) == name]
    return req.specifier


@pytest.mark.parametrize(
    ("extra", "name", "too_old", "fine"),
    [
        ("train", "torch", "2.2.2", "2.3.0"),  # torch.amp.GradScaler("cuda") is 2.3
        ("export", "torch", "2.2.2", "2.3.0"),
        ("cpu", ORT_CPU, "1.17.3", "1.18.0"),  # 1.17 is built for TensorRT 8.6
        ("gpu", ORT_GPU, "1.18.1", "1.19.0"),  # 1.18's PyPI wheels are CUDA 11.8
        ("tensorrt", "tensorrt", "8.6.1", "10.3.0"),
        ("tensorrt", "cuda-python", "12.4.0", "12.6.0"),
        ("jetson", "cuda-python", "12.4.0", "12.9.2"),
    ],
)
def test_version_floors(extra, name, too_old, fine):
    spec = _specifier(_from_setup_cfg(), extra, name)
    assert too_old not in spec and fine in spec, f"{extra}: {name}{spec}"


@pytest.mark.parametrize("extra", ["tensorrt", "jetson"])
def test_cuda_python_stays_below_13_for_jetpack_6(extra):
    """cuda-python 13 needs a CUDA 13 driver (580+); JetPack 6's is CUDA 12.6."""
    spec = _specifier(_from_setup_cfg(), extra, "cuda-python")
    assert "13.0.0" not in spec and "12.9.2" in spec


def test_this_environment_has_exactly_one_onnx_runtime():
    found = ort_install.installed()
    assert len(found) == 1, ort_install.conflict_message(found) or ort_install.MISSING
    assert ort_install.conflict() is None


def test_conflict_message_says_what_to_do():
    assert ort_install.conflict_message({}) is None
    assert ort_install.conflict_message({ORT_CPU: "1.20.1"}) is None
    both = ort_install.conflict_message({ORT_GPU: "1.20.1", ORT_CPU: "1.22.0"})
    assert "\n" not in both
    assert both.startswith(
        "onnxruntime 1.22.0 and onnxruntime-gpu 1.20.1 are both installed and overwrite "
        "each other's 'onnxruntime' module (GPU providers may be missing): "
        "pip uninstall -y onnxruntime onnxruntime-gpu, then reinstall one (onnxruntime-gpu"
    )


def test_installed_asks_each_distribution():
    versions = {"onnxruntime-gpu": "1.20.1", "onnxruntime-openvino": "1.19.0"}

    def version(name: str) -> str:
        if name not in versions:
            raise importlib.metadata.PackageNotFoundError(name)
        return versions[name]

    assert ort_install.installed(version) == versions
    assert "onnxruntime-gpu 1.20.1 and onnxruntime-openvino 1.19.0" in (
        ort_install.conflict_message(ort_install.installed(version))
    )


# The CLI in a process where `import onnxruntime` fails, as after a plain `pip install .`.
NO_ORT = textwrap.dedent(
    """
    import sys
    sys.modules["onnxruntime"] = None  # import onnxruntime now raises ImportError
    from msn_edge.cli import main
    main(sys.argv[1:], prog_name="msn-edge")
    """
)


def test_without_an_onnx_runtime_the_cli_says_which_extra_to_install(tmp_path):
    bundle = make_toy_bundle(tmp_path / "toy.msn")
    fe = read_bundle(bundle).frontend
    sf.write(tmp_path / "clip.wav", normal_signal(fe, np.random.default_rng(0)), fe.sample_rate)

    def run(*args):
        return subprocess.run(
            [sys.executable, "-c", NO_ORT, *args], capture_output=True, text=True, timeout=120
        )

    assert run("--help").returncode == 0
    done = run("score", str(bundle), str(tmp_path / "clip.wav"))
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip() == f"Error: {ort_install.MISSING}"
    assert "msn-edge[cpu]" in done.stderr and "Traceback" not in done.stderr


# The module-level third-party imports of every msn_edge module that `import MODULE` loads.
IMPORTED_DISTRIBUTIONS = textwrap.dedent(
    """
    import ast, importlib, importlib.metadata, json, sys
    importlib.import_module(sys.argv[1])
    owners = importlib.metadata.packages_distributions()
    found = set()
    for name, module in list(sys.modules.items()):
        if not name.startswith("msn_edge") or not getattr(module, "__file__", None):
            continue
        tree = ast.parse(open(module.__file__).read())
        # Module level; of a try or an if, the first choice (else/except hold fallbacks).
        tops = [s for top in tree.body
                for s in (top.body if isinstance(top, (ast.Try, ast.If)) else [top])]
        nodes = [n for top in tops if not isinstance(top, (ast.FunctionDef, ast.ClassDef))
                 for n in ast.walk(top)]
        for node in nodes:
            if isinstance(node, ast.Import):
                tops = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                tops = [node.module.split(".")[0]]
            else:
                continue
            for top in tops:
                if top != "msn_edge" and top not in sys.stdlib_module_names:
                    found.update(owners.get(top, [top]))
    print(json.dumps(sorted(found)))
    """
)


def _installed_closure(reqs: list[Requirement]) -> set[str]:
    """The distributions that installing `reqs` brings: them and all they require."""
    seen: set[str] = set()
    todo = list(reqs)
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.distribution(name).requires or []
        except importlib.metadata.PackageNotFoundError:
            continue
        todo += [Requirement(r) for r in requires]
    return seen


@pytest.mark.parametrize(
    ("module", "extras"),
    [
        ("msn_edge.export.pack", ("cpu", "export")),  # `msn-edge export` (and its int8, eval)
        ("msn_edge.runtime.monitor", ("cpu",)),  # the edge box
    ],
)
def test_each_extra_installs_what_its_code_imports(module, extras):
    done = subprocess.run(
        [sys.executable, "-c", IMPORTED_DISTRIBUTIONS, module],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    imported = {canonicalize_name(d) for d in json.loads(done.stdout)}
    declared = _from_setup_cfg()
    installs = _installed_closure([r for e in (BASE, *extras) for r in declared[e]])
    assert imported - installs == set(), f"{module} imports them; add them to {extras}"
