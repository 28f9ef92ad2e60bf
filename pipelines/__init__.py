"""Beam pipelines: one module per pipeline, each with build_pipeline() and run()."""
