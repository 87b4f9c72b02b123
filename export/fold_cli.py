"""`bnpipe fold IN.onnx OUT.onnx`: a thin click command over :func:`bnpipe.export.onnx_fold_file.fold_onnx_file`."""

from __future__ import annotations

import click

from bnpipe.export.onnx_fold_file import DEFAULT_TOLERANCE


@click.command()
@click.argument("src", metavar="IN.onnx", type=click.Path(dir_okay=False))
@click.argument("out", metavar="OUT.onnx", type=click.Path(dir_okay=False))
@click.option("--shape", "shapes", multiple=True, metavar="NAME=D1,D2,...",
              help="Shape of an input for verification (repeatable); other dynamic dims are 1.")
@click.option("--tolerance", type=click.FloatRange(min=0), default=DEFAULT_TOLERANCE, show_default=True,
              help="Largest max |difference| against the original, relative to the output's magnitude.")
@click.option("--strict", is_flag=True, help="A BatchNormalization that cannot be folded is an error.")
def fold(src: str, out: str, shapes: tuple[str, ...], tolerance: float, strict: bool) -> None:
    """Fold each BatchNormalization of any ONNX model into the Conv, ConvTranspose, Gemm or MatMul+Add before it.

    The fold is exact (float64, each BN's own epsilon, one rounding to the weight's type). The result
    passes onnx.checker and is run in onnxruntime (CPU) against the original on random inputs before it
    is renamed into place; over --tolerance nothing is written.
    """
    from bnpipe.export.onnx_fold_file import fold_onnx_file
    from bnpipe.export.onnx_verify import parse_shape

    report = fold_onnx_file(src, out, shapes=dict(parse_shape(s) for s in shapes), tolerance=tolerance, strict=strict)
    for line in report.lines():
        click.echo(line)
