"""`bnpipe fold` as a library call: load an ONNX file, fold its BNs, check and verify, write it atomically."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from bnpipe import __version__
from bnpipe.atomic import atomic_path, check_writable, made_dirs
from bnpipe.errors import BnpipeError, one_line
from bnpipe.export.onnx_fold import fold_graph
from bnpipe.export.onnx_verify import (
    default_tolerance, dynamic_inputs, graph_stats, random_inputs, relative_difference, run_cpu, set_metadata,
)  # fmt: skip


@dataclass
class FoldFileReport:
    """What `bnpipe fold` did to a file and how the result compared with the original."""

    out: Path
    before: dict[str, int]
    after: dict[str, int]
    max_rel_diff: float
    tolerance: float
    seconds: float
    folded: list[tuple[str, str]] = field(default_factory=list)
    left: dict[str, str] = field(default_factory=dict)

    def lines(self) -> list[str]:
        """The human-readable report, one fact per line."""
        b, a = self.before, self.after
        out = [f"wrote {self.out}: nodes {b['nodes']} -> {a['nodes']}, "
               f"BatchNormalization nodes {b['bn_nodes']} -> {a['bn_nodes']}"]  # fmt: skip
        out += [f"folded {bn} into {producer}" for producer, bn in self.folded]
        out += [f"left in place: {bn} ({why})" for bn, why in self.left.items()]
        out += [f"verified with onnxruntime (CPU) on random inputs: max difference {self.max_rel_diff:.3g} "
                f"of the output's magnitude (tolerance {self.tolerance:g})",
                f"done in {self.seconds:.2f}s"]  # fmt: skip
        return out


def load_onnx(path: str | os.PathLike[str]) -> tuple[onnx.ModelProto, bool]:
    """Load an ONNX file with its external data, or raise one line saying why not.

    Returns:
        The model, and whether it kept weights in external data files.
    """
    p = Path(path)
    if not p.is_file():
        raise BnpipeError(f"{path}: no such file" if not p.exists() else f"{path}: not a file")
    try:
        # The binary format whatever the suffix: onnx would parse a .json or .txt file as text protobuf.
        model = onnx.load(str(p), format="protobuf", load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, UnicodeDecodeError) as exc:
        raise BnpipeError(f"{path}: not an ONNX model ({one_line(exc, 120)})") from None
    except OSError as exc:
        raise BnpipeError(f"{path}: cannot read it ({exc.strerror or one_line(exc)})") from None
    external = _uses_external_data(model)
    if external:
        from onnx.external_data_helper import load_external_data_for_model

        try:
            load_external_data_for_model(model, str(p.parent))
        except (OSError, onnx.checker.ValidationError) as exc:  # missing, not a file, unreadable
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else one_line(exc, 200)
            raise BnpipeError(f"{path}: cannot read its external data ({why})") from None
    if model.ir_version == 0 or not model.HasField("graph") or not model.graph.node:
        raise BnpipeError(f"{path}: not an ONNX model (no IR version or no graph)")
    try:  # a node without its inputs would otherwise fail deep inside the fold
        # The loaded model, not parsed again; by path where it has external data: it may pass 2 GB in memory.
        onnx.checker.check_model(str(p) if external else model)
    except onnx.checker.ValidationError as exc:
        raise BnpipeError(f"{path}: not a valid ONNX model ({one_line(exc, 160)})") from None
    return model, external


def _uses_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def _move_to_external_data(model: onnx.ModelProto, location: str) -> None:
    """Mark the main graph's weights of 1 KB or more to be saved in the file ``location`` beside the model.

    As ``onnx.save(save_as_external_data=True)`` does, less its check that ``location`` does not exist
    in the current directory (not the model's: it fails whenever a same-named file sits there).
    """
    from onnx.external_data_helper import set_external_data

    for tensor in model.graph.initializer:
        if tensor.HasField("raw_data") and sys.getsizeof(tensor.raw_data) >= 1024:  # onnx's own threshold
            set_external_data(tensor, location)


def fold_onnx_file(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    shapes: Mapping[str, Sequence[int]] | None = None,
    tolerance: float | None = None,
    strict: bool = False,
) -> FoldFileReport:
    """Fold the BatchNormalization nodes of an ONNX file exactly, verify, and write ``out``.

    The folded model is written to a staging folder beside ``out``, passes
    ``onnx.checker.check_model(full_check=True)``, and runs in onnxruntime (CPU) on random inputs against
    the original; only then is it renamed into place. A model stored with external data is written with
    its weights in ``<out name>.data`` beside it.

    Args:
        src: The ONNX file to fold.
        out: Where to write the folded model; must differ from ``src``.
        shapes: Input name -> shape for verification; other dynamic dims are 1.
        tolerance: Largest max |difference| / max |output| allowed, over all outputs; None takes
            `default_tolerance` of the model (looser for float16 and bfloat16 models).
        strict: A BatchNormalization left in place is an error.

    Returns:
        The report.

    Raises:
        BnpipeError: Bad input or output path, a training-mode BN, a BN left with ``strict``, a model that
            fails the checker or onnxruntime, or a verification over ``tolerance``; no file is written.
    """
    t0 = time.perf_counter()
    src_path, out_path = Path(src), Path(out)
    if out_path.exists() and src_path.exists() and os.path.samefile(out_path, src_path):  # links too
        raise BnpipeError(f"{out}: is the input file; write the folded model to another path")
    model, external = load_onnx(src_path)
    feeds = random_inputs(model, shapes or {})  # a bad --shape fails before any work; folding keeps the inputs
    guessed = [name for name in dynamic_inputs(model) if name not in (shapes or {})]
    tolerance = default_tolerance(model) if tolerance is None else tolerance
    check_writable(out)  # as given: Path("") would be "."
    before = graph_stats(model)
    folded = fold_graph(model)
    if strict and folded.left:
        left = "; ".join(f"{bn} ({why})" for bn, why in folded.left.items())
        nodes = "1 BatchNormalization" if len(folded.left) == 1 else f"{len(folded.left)} BatchNormalization nodes"
        raise BnpipeError(f"--strict: {nodes} cannot be folded: {left}")
    meta = {p.key: p.value for p in model.metadata_props}
    meta["bnpipe_folded"] = json.dumps({"bnpipe_version": __version__, "folded": len(folded.folded),
                                        "left": len(folded.left)})  # fmt: skip
    if folded.folded and not folded.left and "bn_folded" in meta:  # a bnpipe export's flag now tells the truth
        meta["bn_folded"] = "true"
    set_metadata(model, meta)

    with made_dirs(out_path.parent), tempfile.TemporaryDirectory(prefix=".bnpipe-fold.", dir=out_path.parent) as stage:
        staged = Path(stage) / out_path.name
        data_name = f"{out_path.name}.data"
        if external:
            _move_to_external_data(model, data_name)
        try:  # the binary format whatever OUT's suffix (onnx would write JSON to a .json name)
            onnx.save(model, str(staged), format="protobuf")
        except ValueError as exc:  # past protobuf's 2 GB without external data
            raise BnpipeError(f"{out}: cannot serialize the model ({one_line(exc)})") from None
        except OSError as exc:
            raise BnpipeError(f"{out}: cannot write ({exc.strerror or one_line(exc)})") from None
        try:
            onnx.checker.check_model(str(staged), full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            raise BnpipeError(f"{out}: the folded model fails onnx.checker: {one_line(exc)}") from None
        try:
            want = run_cpu(src_path, feeds)
        except BnpipeError as exc:
            if not guessed:
                raise
            raise BnpipeError(f"{exc} (dynamic dims of {', '.join(guessed)} were set to 1 for the check: "
                              "give real shapes with --shape NAME=D1,D2,...)") from None
        got = run_cpu(staged, feeds)
        diff = max((relative_difference(w, g) for w, g in zip(want, got)), default=0.0)
        if len(want) != len(got) or not diff <= tolerance:  # `not <=` also catches NaN
            raise BnpipeError(f"{out}: verification failed, max difference {diff:.3g} of the output's magnitude "
                              f"exceeds --tolerance {tolerance:g}; no file written")  # fmt: skip
        if (Path(stage) / data_name).exists():  # tensors under 1 KB stay inside the model file
            with atomic_path(out_path.parent / data_name) as tmp:
                shutil.move(str(Path(stage) / data_name), tmp)
                # Two files cannot be replaced as one: an old OUT must never be seen with the new weights,
                # whose offsets it would read as its own. So it goes once they are written, before they
                # take the name; a crash between the renames leaves no OUT.
                out_path.unlink(missing_ok=True)
        with atomic_path(out_path) as tmp:
            shutil.move(str(staged), tmp)
    return FoldFileReport(out_path, before, graph_stats(model), diff, tolerance, time.perf_counter() - t0,
                          folded.folded, folded.left)  # fmt: skip
