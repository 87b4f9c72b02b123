"""`bnpipe fold IN.onnx OUT.onnx`: a thin click command over :func:`bnpipe.export.onnx_fold_file.fold_onnx_file`."""

from __future__ import annotations

import click

from bnpipe.errors import BnpipeError
from bnpipe.params import FiniteRange


def _shapes(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    from bnpipe.export.onnx_verify import parse_shape

    try:
        return dict(parse_shape(v) for v in values)
    except BnpipeError as exc:  # a usage error: exit 2, as click's own
        raise click.BadParameter(str(exc).removeprefix("--shape "), ctx, param) from None


@click.command()
@click.argument("src", metavar="IN.onnx", type=click.Path(dir_okay=False))
@click.argument("out", metavar="OUT.onnx", type=click.Path(dir_okay=False))
@click.option("--shape", "shapes", multiple=True, metavar="NAME=D1,D2,...", callback=_shapes,
              help="Shape of an input for verification (repeatable); other dynamic dims are 1.")
@click.option("--tolerance", type=FiniteRange(min=0), default=None,
              help="Largest max |difference| against the original, relative to the output's magnitude "
                   "[default: 1e-4; 8 epsilons for a float16 or bfloat16 model].")
@click.option("--strict", is_flag=True, help="A BatchNormalization that cannot be folded is an error.")
def fold(src: str, out: str, shapes: dict[str, tuple[int, ...]], tolerance: float | None, strict: bool) -> None:
    """Fold each BatchNormalization of any ONNX model into the Conv, ConvTranspose, Gemm or MatMul+Add before it.

    The fold is exact (float64, each BN's own epsilon, one rounding to the weight's type). The result
    passes onnx.checker and is run in onnxruntime (CPU) against the original on random inputs before it
    is renamed into place; over --tolerance nothing is written.
    """
    from bnpipe.export.onnx_fold_file import fold_onnx_file

    report = fold_onnx_file(src, out, shapes=shapes, tolerance=tolerance, strict=strict)
    for line in report.lines():
        click.echo(line)
