"""Compile: ONNX export with stable layer names, PyTorch↔ONNX parity, static QDQ
quantization per policy, accuracy under ONNX Runtime, atomic artifact packaging."""
