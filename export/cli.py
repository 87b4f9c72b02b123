"""`bnpipe export`: a thin click command over :func:`bnpipe.export.pipeline.export_checkpoint`."""

from __future__ import annotations

import click

from bnpipe.params import FiniteRange
from bnpipe.train.config import DEFAULT_CHECKPOINT

DEFAULT_ONNX = "models/bn_convnet.onnx"


@click.command()
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=DEFAULT_CHECKPOINT, show_default=True,
              help="Checkpoint written by `bnpipe train`.")
@click.option("--out", type=click.Path(dir_okay=False), default=DEFAULT_ONNX, show_default=True,
              help="ONNX file to write.")
@click.option("--fold-bn/--no-fold-bn", default=False, show_default=True,
              help="Fold each BatchNorm's moving statistics into the conv/linear layer before it.")
@click.option("--strict", is_flag=True, help="With --fold-bn: a BatchNorm that cannot be folded is an error.")
@click.option("--tolerance", type=FiniteRange(min=0), default=1e-4, show_default=True,
              help="Largest max |logit difference| against PyTorch before the export fails.")
@click.option("--opset", type=click.IntRange(min=18, max=25), default=18, show_default=True,
              help="ONNX opset version (the dynamo exporter needs 18 or newer).")
@click.option("--data", type=click.Path(file_okay=False), default=None,
              help="MNIST root for verification images (must hold them). Default: $BNPIPE_DATA, else ./data; "
                   "random pixels if absent.")
@click.option("--triton-repo", type=click.Path(file_okay=False), default=None,
              help="Also write a Triton model repository here: NAME/config.pbtxt and NAME/1/model.onnx.")
@click.option("--triton-device", type=click.Choice(["gpu", "cpu"]), default="gpu", show_default=True,
              help="The repository's instances: KIND_GPU (with predict's CUDA options) or KIND_CPU.")
@click.option("--triton-name", default="bnpipe", show_default=True, help="The model's name in the repository.")
def export(checkpoint: str, out: str, fold_bn: bool, strict: bool, tolerance: float, opset: int,
           data: str | None, triton_repo: str | None, triton_device: str, triton_name: str) -> None:
    """Export a checkpoint to ONNX (uint8 pixels in, logits out) and verify it against PyTorch.

    The written model is run in onnxruntime on MNIST test images (or random pixels) and compared
    with PyTorch eval of the unfolded checkpoint; over --tolerance, the export fails and leaves no file.
    """
    if strict and not fold_bn:
        raise click.UsageError("--strict only applies with --fold-bn")
    from bnpipe.datadir import resolve_data_root
    from bnpipe.export.pipeline import export_checkpoint

    report = export_checkpoint(checkpoint, out, fold_bn=fold_bn, strict=strict, tolerance=tolerance, opset=opset,
                               data_root=resolve_data_root(data), triton_repo=triton_repo,
                               triton_device=triton_device, triton_name=triton_name, require_data=data is not None)
    for line in report.lines():
        click.echo(line)
