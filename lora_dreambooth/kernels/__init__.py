"""Low-level compute kernels the models run through (no package imports: any stage may use them)."""
