"""Debugging tools: re-running a saved iteration on a CPU, comparing layouts."""
