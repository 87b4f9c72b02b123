"""bnpipe.serve: `bnpipe predict` and `bnpipe serve` with onnxruntime on the GPU or the CPU. Never imports torch or onnx.

Modules: `image` (any Pillow format to a grayscale array; bad files refused with one line),
`png` (the fast path for plain 8-bit grayscale PNGs), `gray` (gray levels from any mode),
`preprocess` (pure MNIST-style normalization), `runtime` (provider choice, model contract,
session), `cuda` (GPU probe and the nvidia-* wheels' libraries), `inputs` (PATHs to inputs),
`predict` (decoding, batches, and `run`: the whole command as a function), `output`
(text and JSON Lines), `cli` (the click command), `samples` (MNIST test images as PNGs).
The server: `v2` (the V2 request and response codec),
`bodies` (bounded reading and gzip/deflate), `batcher` (dynamic batching in a worker thread), `metrics`,
`app` (the Starlette app), `predict_route` (`/v1/predict`), `server_cli` (`bnpipe serve`), `triton_config`
and `triton_repo` (Triton's model configuration and repository), `static/index.html` (the page).
"""
