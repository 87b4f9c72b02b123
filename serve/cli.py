"""`bnpipe predict`: label digit images with the exported ONNX model (onnxruntime, no torch)."""

from __future__ import annotations

import os
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
              help="Decode processes; 0 decodes in-process [default: one per CPU from 512 images on, else 0].")
@click.option("-v", "--verbose", is_flag=True, help="Say on stderr which execution provider ran.")
def predict(paths: tuple[str, ...], model_path: str, device: str, batch_size: int, as_json: bool,
            top_k: int, workers: int | None, verbose: bool) -> None:
    """Print the label of each image in PATHS (image files, directories taken recursively, or - for stdin).

    Text output is `path<TAB>label<TAB>probability` per image, in input order; an image that
    cannot be read is reported on stderr as `bnpipe: error: <path>: <why>`. Exit status: 0 when
    every image was labelled, 1 when any failed or the model is unusable, 2 for usage errors.
    """
    from bnpipe.serve.output import json_line, text_lines
    from bnpipe.serve.predict import STDIN, decode_batches, decoding_pool, expand_inputs
    from bnpipe.serve.predict import predict as run_predict
    from bnpipe.serve.runtime import Model

    if paths.count(STDIN) > 1:
        raise click.UsageError("'-' (stdin) can be given only once")
    stdin = sys.stdin.buffer.read() if STDIN in paths else None
    items = expand_inputs(paths, stdin)
    failed = 0
    try:
        with decoding_pool(len(items), workers) as pool:
            decoded = decode_batches(items, batch_size, pool)  # workers start now, while the model loads
            # With decode processes busy on the other cores, one inference thread avoids oversubscribing.
            model = Model.load(model_path, device, verbose, threads=1 if pool is not None else None)
            if verbose:
                click.echo(f"bnpipe: {model_path} runs on {model.provider}", err=True)
            # The text form shows only the top label: ranking more would be wasted work.
            for batch in run_predict(model, decoded, top_k if as_json else 1):
                failed += sum(p.error is not None for p in batch)
                if as_json:
                    out, err = [json_line(p) for p in batch], []
                else:
                    out, err = text_lines(batch)
                if out:
                    sys.stdout.write("\n".join(out) + "\n")
                if err:
                    sys.stdout.flush()  # keep the two streams in input order on a terminal
                    sys.stderr.write("\n".join(err) + "\n")
            sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, and keep Python's exit flush from raising.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    if failed:
        sys.exit(1)
