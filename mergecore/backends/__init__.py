"""Compute backends: ``reference`` (float64 torch), ``cpu`` (C++), ``triton`` (CUDA)."""
