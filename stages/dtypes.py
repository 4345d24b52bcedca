"""The compute dtypes a job may name, without importing torch (the spec and the CLI stay light)."""

DTYPE_NAMES = ("float32", "float16", "bfloat16")
