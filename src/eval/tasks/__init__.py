"""Tasks: synthetic (arith, listops) and the shipped benchmarks."""
