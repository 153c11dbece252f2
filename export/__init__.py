"""Export: ONNX graphs, bundle writer, parity reports, TensorRT builder, Triton repository."""
