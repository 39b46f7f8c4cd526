"""Speed benchmarks: `python -m benchmarks [--quick] [--device cpu|cuda]` (see docs/performance.md)."""
