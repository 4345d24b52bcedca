"""The compute dtypes, compile modes and micro-batch a job may name, without importing torch (the spec and the CLI stay
light)."""

DTYPE_NAMES = ("float32", "float16", "bfloat16")
COMPILE_MODES = ("max-autotune",)  # `stages.<name>.compile` values besides true and false (torch.compile modes)
MICRO_BATCH = 8  # rows per model call unless `stages.<name>.micro_batch` says (see stages/batching.py)
