"""crosscheck: runs torch's eager fbgemm quantization and refquant side by side and compares every value."""
