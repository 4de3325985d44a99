"""`msn-edge train` and `msn-edge info`: thin layers over msn_edge.training and the model."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from msn_edge.cli import common, main
from msn_edge.cli.common import given, setup_logging, user_errors
from msn_edge.config import DEFAULT_RECIPE, PRESETS, RECIPES

AUX_CHOICES = ("transforms", "both", "synth", "none")
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


@main.command()
@click.argument(
    "data", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path)
)
@common.path_option(
    "-o",
    "--output",
    "run_dir",
    folder=True,
    required=True,
    help="Run folder: checkpoints, log, prototypes.",
)
@click.option(
    "--preset",
    "preset_name",
    type=click.Choice(list(PRESETS)),
    default="dcase2020",
    show_default=True,
    help="Model and front-end size (with --resume: the run's own unless given).",
)
@click.option(
    "--recipe",
    type=click.Choice(list(RECIPES)),
    default=None,
    help="How to train (msn_edge.config.RECIPES): logspec-speed (log spectrogram with band "
    "levels, each class also at 4 speeds, no mixup), logspec-adaproj (the same with the "
    "AdaProj loss), log-speed (log spectrum too) or paper  "
    f"[default: {DEFAULT_RECIPE}]",
)
@common.count_option("--epochs", help="Epochs  [default: the preset's]")
@common.count_option("--batch-size", minimum=2, help="Global batch size  [default: the preset's]")
@click.option("--seed", type=int, default=None, help="Random seed  [default: the preset's]")
@common.count_option(
    "--workers",
    minimum=0,
    help="DataLoader processes computing the front-end  [default: the preset's]",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Continue RUN/checkpoint.pt with its config (--epochs may raise the total).",
)
@click.option(
    "--device",
    type=click.Choice(["cpu", "cuda"]),
    default=None,
    help="Training device  [default: cuda if present]",
)
@click.option(
    "--aux",
    type=click.Choice(AUX_CHOICES),
    default="transforms",
    show_default=True,
    help="Auxiliary classes added when the data has fewer than two classes: the machine's "
    "own clips slightly slower/faster, synthetic machines, both; none = an error.",
)
@click.option("--no-progress", is_flag=True, help="No progress bar (logs only).")
@user_errors
def train(
    data,
    run_dir,
    preset_name,
    recipe,
    epochs,
    batch_size,
    seed,
    workers,
    resume,
    device,
    aux,
    no_progress,
):
    """Train an MSN on the normal training clips of DATA (one or more data sets, jointly).

    Writes RUN/checkpoint.pt after every epoch (RUN/epochs/ keeps each epoch's weights),
    RUN/train_log.jsonl, and when done the scoring prototypes and thresholds. Ctrl-C
    stops cleanly and keeps the last complete checkpoint; --resume continues it. Under
    torchrun it trains with DistributedDataParallel.

    Example:

    \b
        msn-edge train data/fan data/pump -o runs/fan --preset tiny --epochs 20
        torchrun --nproc_per_node 2 --no-python msn-edge train data/fan -o runs/fan
    """
    setup_logging()
    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun, rank 0 alone reports
        logging.getLogger().setLevel(logging.ERROR)
    from tqdm.contrib.logging import logging_redirect_tqdm

    from msn_edge.config import training_config
    from msn_edge.training import train as run_training

    preset_given = given(click.get_current_context(), "preset_name")
    config = training_config(
        preset_name if preset_given else None,
        resume_from=run_dir if resume else None,
        recipe=recipe,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        num_workers=workers,
    )
    try:
        with logging_redirect_tqdm():  # log lines do not break the progress bar
            result = run_training(
                list(data),
                run_dir,
                config,
                resume=resume,
                device=device,
                progress=not no_progress,
                aux=aux,
            )
    except KeyboardInterrupt:  # train() catches it once training runs: this is before
        click.echo("Interrupted before training started; nothing new was written.", err=True)
        sys.exit(EXIT_INTERRUPTED)
    if result.interrupted:
        where = f"{result.checkpoint} (epoch {result.epoch})" if result.checkpoint else "none"
        click.echo(
            f"Interrupted; last complete checkpoint: {where}. Continue with --resume.", err=True
        )
        sys.exit(EXIT_INTERRUPTED)
    logging.getLogger(__name__).info("trained %d epochs; run in %s", result.epoch, run_dir)


@main.command()
@click.argument("bundle", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--preset",
    "preset_name",
    type=click.Choice(list(PRESETS)),
    help="A preset's network [default: dcase2020 when no BUNDLE is given].",
)
@user_errors
def info(bundle: Path | None, preset_name: str | None):
    """A bundle's models, groups and enrollment history; or a preset's network size.

    With BUNDLE (torch-free): its models, front-end, scoring groups with prototype counts
    and thresholds, and every `msn-edge enroll` that made it. With --preset: parameters
    and multiply-accumulates per window of that MSN, per branch.

    Example:

    \b
        msn-edge info fan.msn
        msn-edge info --preset tiny
    """
    if bundle is not None:
        if preset_name is not None:
            raise click.UsageError("give a BUNDLE or --preset, not both")
        from msn_edge.runtime.bundle import read_bundle
        from msn_edge.runtime.history import describe

        click.echo(describe(read_bundle(bundle)))
        return
    preset_name = preset_name or "dcase2020"
    from msn_edge.config import preset
    from msn_edge.model import MSN, count_macs

    config = preset(preset_name)
    model = MSN(config.model)
    fe = config.frontend
    click.echo(
        f"preset {preset_name}: {fe.window_s:g} s window, spectrogram {fe.n_freq}x{fe.n_frames}, "
        f"spectrum {fe.spectrum_bins} bins, embedding {config.model.embedding_dim}"
    )
    click.echo(f"{'part':<12} {'params':>12} {'MACs':>16}")
    macs = count_macs(model, per_branch=True)
    for name, module in model.named_children():
        params = sum(p.numel() for p in module.parameters())
        click.echo(f"{name:<12} {params:>12,} {macs[name]:>16,}")
    total = sum(p.numel() for p in model.parameters())
    click.echo(f"{'total':<12} {total:>12,} {sum(macs.values()):>16,}")
