"""User-facing jobs: the spec, generate, benchmark, and the CLI."""
