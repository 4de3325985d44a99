"""`msn-edge synth` (make a synthetic data set) and `msn-edge datasets` (check a data folder)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from msn_edge.cli import common, main
from msn_edge.cli.common import FiniteFloat, user_errors
from msn_edge.runtime.errors import MsnEdgeError
from msn_edge.synth import KINDS


@main.command("synth")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--seed", default=0, show_default=True, help="Seed of the machines and clips.")
@click.option(
    "--kind",
    "kinds",
    multiple=True,
    type=click.Choice(KINDS),
    help="Machine kind; repeat for several  [default: all]",
)
@click.option(
    "--ids", default=2, show_default=True, type=click.IntRange(1, 100), help="Machine IDs per kind."
)
@common.count_option(
    "--train",
    "n_train",
    minimum=0,
    default=30,
    show_default=True,
    help="Normal training clips per ID.",
)
@common.count_option(
    "--test",
    "n_test",
    minimum=0,
    default=10,
    show_default=True,
    help="Normal test clips per ID, and as many anomalous ones.",
)
@common.seconds_option(
    "--seconds",
    low=1.0,
    low_open=False,
    high=3600.0,
    default=10.0,
    show_default=True,
    help="Clip length.",
)
@click.option(
    "--test-speed",
    default=1.0,
    show_default=True,
    type=FiniteFloat(min=0.5, max=2.0),
    help="Run the test clips' machines this much faster: a domain shift (normal "
    "operating points not in training).",
)
@user_errors
def synth_command(
    out: Path,
    seed: int,
    kinds: tuple[str, ...],
    ids: int,
    n_train: int,
    n_test: int,
    seconds: float,
    test_speed: float,
) -> None:
    """Write a synthetic machine-sound data set to OUT, in the DCASE 2020 layout.

    Fans, valves and sliders, several machines (IDs) each, with faults in the test split
    (bearing defects, imbalance, rubbing; missing, extra or late valve impacts; rail
    damage). Same seed, same bytes. OUT/synth.json records each machine's parameters and
    each anomalous clip's fault. The defaults train the `tiny` preset in minutes on a CPU.

    Example:

    \b
        msn-edge synth data/synth --seed 0
        msn-edge datasets data/synth
    """
    from msn_edge.synth import synthesize

    summary = synthesize(
        out,
        seed=seed,
        kinds=kinds or KINDS,
        ids_per_kind=ids,
        n_train=n_train,
        n_test_normal=n_test,
        n_test_anomaly=n_test,
        seconds=seconds,
        test_speed=test_speed,
        progress=True,
    )
    minutes = summary["seconds"] / 60
    click.echo(f"wrote {summary['clips']} clips ({minutes:.1f} min of audio) to {out}")
    for kind, c in summary["kinds"].items():
        faults = ", ".join(f"{a} {k}" for a, k in c["faults"].items()) or "none"
        click.echo(
            f"{kind}: {c['ids']} IDs, train {c['train normal']} normal, test "
            f"{c['test normal']} normal + {c['test anomaly']} anomalous ({faults})"
        )


@main.command("datasets")
@click.argument("data", type=click.Path(path_type=Path))
@click.option(
    "--split", type=click.Choice(["train", "test"]), default=None, help="Only this split."
)
@click.option(
    "--check",
    is_flag=True,
    help="Also decode every clip: reports unreadable or truncated files, wrong rates, "
    "non-mono audio, NaN/inf samples.",
)
@click.option(
    "--sample-rate",
    default=16_000,
    show_default=True,
    type=click.IntRange(1_000, 384_000),
    help="Rate --check expects, in Hz.",
)
@click.pass_context
@user_errors
def datasets_command(
    ctx: click.Context, data: Path, split: str | None, check: bool, sample_rate: int
) -> None:
    """Show how msn-edge reads the data folder DATA: layout, groups, classes, counts.

    DATA is a DCASE 2020 or 2023 data set (<type>/train, <type>/test), one machine-type
    folder of it, or a plain folder of normal clips (one class per sub-folder). Check
    this before training: the scoring groups and training classes listed are the ones
    `msn-edge train` and `msn-edge evaluate` will use. With --check every clip is decoded
    and each bad file named on stderr; the exit status is then 1.

    Example:

    \b
        msn-edge datasets data/dcase2023_dev --check
    """
    from msn_edge.datasets import describe, load_wave, scan
    from msn_edge.runtime.frontend import FrontendConfig

    clips = scan(data, split)
    click.echo(describe(clips), nl=False)
    if not check:
        return
    frontend = FrontendConfig(sample_rate=sample_rate)
    bad = 0
    with click.progressbar(clips, label="decoding", file=sys.stderr) as bar:
        for clip in bar:
            try:
                load_wave(clip, frontend)
            except MsnEdgeError as e:
                click.echo(f"\nError: {e}", err=True)
                bad += 1
    click.echo(f"decoded {len(clips)} clips: {bad or 'none'} unreadable")
    if bad:
        ctx.exit(1)


@main.command("synth-stream")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--kind", type=click.Choice(KINDS), default="fan", show_default=True)
@click.option("--id", "machine_id", default=0, show_default=True, help="Machine ID.")
@click.option("--seed", default=0, show_default=True, help="Seed of the `synth` data set.")
@click.option(
    "--normal",
    "normal_s",
    type=(FiniteFloat(min=0, max=86400), FiniteFloat(min=0, max=86400)),
    default=(60.0, 60.0),
    show_default=True,
    help="Seconds of normal running before and after the fault.",
)
@common.seconds_option(
    "--fault-seconds",
    low_open=False,
    high=86400,
    default=60.0,
    show_default=True,
    help="Length of the faulty stretch.",
)
@click.option("--fault", default=None, help="Fault name [default: the kind's first].")
@user_errors
def synth_stream_command(
    out: Path,
    kind: str,
    machine_id: int,
    seed: int,
    normal_s: tuple[float, float],
    fault_seconds: float,
    fault: str | None,
) -> None:
    """Write one continuous recording of a synthetic machine with a faulty stretch.

    The machine is the one `msn-edge synth --seed SEED` writes as <kind>/id_<ID>, so a model
    trained on that set can monitor this recording. The fault fades in and out.

    Example:

    \b
        msn-edge synth-stream stream.wav --kind fan --id 0 --normal 60 60 --fault-seconds 60
        msn-edge monitor fan.msn --input stream.wav --group fan/id_00
    """
    import soundfile as sf

    from msn_edge.synth import ANOMALIES, SAMPLE_RATE, synth_stream

    if fault is not None and fault not in ANOMALIES[kind]:
        raise click.BadParameter(
            f"{kind} faults are {', '.join(ANOMALIES[kind])}", param_hint="--fault"
        )
    try:
        wave = synth_stream(
            kind, machine_id, normal_s[0], fault_seconds, normal_s[1], seed=seed, anomaly=fault
        )
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    sf.write(str(out), wave, SAMPLE_RATE, subtype="PCM_16")
    start, stop = normal_s[0], normal_s[0] + fault_seconds
    click.echo(
        f"wrote {out}: {wave.size / SAMPLE_RATE:.0f} s of {kind} id_{machine_id:02d}, "
        f"fault {fault or ANOMALIES[kind][0]} from {start:g} s to {stop:g} s"
    )
