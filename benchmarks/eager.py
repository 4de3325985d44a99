"""The PyTorch eager baseline: the training checkpoint's MSN, with the runtime Engine's API.

A benchmark case's factory (cases.EAGER_FACTORY), imported only inside that row's own
worker process, so torch is imported there and nowhere else: `msn-edge bench` runs on an
edge box without torch, where the row is listed as skipped.
"""

from __future__ import annotations

from msn_edge.runtime.errors import BackendError


class EagerEngine:
    """The training checkpoint's MSN in PyTorch eager mode, with the runtime Engine's API."""

    name = "pytorch-eager"
    precision = "fp32"

    def __init__(self, model) -> None:
        self.model = model.eval()

    def embed(self, spec, spectrum):
        import torch
        import torch.nn.functional as F

        with torch.inference_mode():
            emb = self.model(torch.from_numpy(spec), torch.from_numpy(spectrum))
            return F.normalize(emb, dim=1).numpy()


def eager_engine(bundle, case, settings, checkpoint: str) -> EagerEngine:
    """Bench factory (see cases.Case): the checkpoint that `bundle` was exported from."""
    import torch

    from msn_edge.checkpoint import load_checkpoint

    torch.set_num_threads(settings.threads)
    run = load_checkpoint(checkpoint)
    if run.config.frontend != bundle.frontend:
        raise BackendError(
            f"{checkpoint}: its front-end ({run.config.frontend.window_s:g} s windows) is "
            f"not the bundle's ({bundle.frontend.window_s:g} s): pass the run it was exported from"
        )
    return EagerEngine(run.model)
