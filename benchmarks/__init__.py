"""convmixer-kernels benchmarks: `python -m benchmarks.run --help`."""
