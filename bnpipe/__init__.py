"""bnpipe: train a BatchNorm conv net, fold BN exactly into ONNX, serve it with onnxruntime."""

__version__ = "0.1.0"
