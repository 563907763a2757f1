"""refquant: a readable NumPy + Numba golden model of PyTorch's fbgemm int8 static quantization."""
