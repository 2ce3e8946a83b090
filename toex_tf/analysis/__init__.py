"""Exit analysis: compute counts, exit sweeps and reports."""
