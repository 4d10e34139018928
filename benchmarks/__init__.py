"""Speed and memory benchmarks (not tests); run each as ``python -m benchmarks.<name>`` (see README.md)."""
