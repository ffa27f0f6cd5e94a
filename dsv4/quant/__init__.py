"""Quantized formats: the QuantFormat enum, QTensor, dequantizers (numpy oracle and torch),
quantizers and recipes (tensor-name pattern -> format). Knows nothing of backends or the model."""
from .formats import QK_K, QTensor, QuantFormat

__all__ = ["QK_K", "QTensor", "QuantFormat"]
