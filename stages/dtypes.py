"""The compute dtypes and compile modes a job may name, without importing torch (the spec and the CLI stay light)."""

DTYPE_NAMES = ("float32", "float16", "bfloat16")
COMPILE_MODES = ("max-autotune",)  # `stages.<name>.compile` values besides true and false (torch.compile modes)
