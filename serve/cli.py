"""`bnpipe predict`: label digit images with the exported ONNX model (onnxruntime, no torch)."""

from __future__ import annotations

import sys

import click

from bnpipe.serve.runtime import DEVICES


@click.command()
@click.argument("paths", nargs=-1, required=True)
@click.option("--model", "model_path", default="models/bn_convnet.onnx", show_default=True,
              help="ONNX model written by `bnpipe export`.")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
              help="auto: CUDA when onnxruntime can use a GPU, else the CPU. cuda never falls back.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Images per onnxruntime run.")
@click.option("--json", "as_json", is_flag=True, help="Write JSON Lines (with top_k) instead of tab-separated text.")
@click.option("--top-k", type=click.IntRange(min=1), default=3, show_default=True,
              help="How many labels each JSON line's top_k lists.")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Decode processes; 0 decodes in-process [default: half the CPUs from 512 images on, none on 2 CPUs].")
@click.option("-v", "--verbose", is_flag=True, help="Say on stderr which execution provider ran.")
def predict(paths: tuple[str, ...], model_path: str, device: str, batch_size: int, as_json: bool,
            top_k: int, workers: int | None, verbose: bool) -> None:
    """Print the label of each image in PATHS (image files, directories taken recursively, or - for stdin).

    Text output is `path<TAB>label<TAB>probability` per image, in input order; an image that
    cannot be read is reported on stderr as `bnpipe: error: <path>: <why>`. Exit status: 0 when
    every image was labelled, 1 when any failed or the model is unusable, 2 for usage errors.
    """
    from bnpipe.serve.inputs import STDIN
    from bnpipe.serve.predict import run  # numpy, Pillow and onnxruntime: only when predicting

    if paths.count(STDIN) > 1:
        raise click.UsageError("'-' (stdin) can be given only once")
    status = run(paths, model_path, device, batch_size, as_json, top_k, workers, verbose)
    if status:
        sys.exit(status)
