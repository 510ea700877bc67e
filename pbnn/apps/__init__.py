"""Layer 7, programs built on the library: the benchmark, the CLI and the demo."""
