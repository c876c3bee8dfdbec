"""ONNX export and the portfolio package (needs the build extra)."""
