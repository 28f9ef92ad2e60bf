"""Composite PTransforms and DoFns shared by the pipelines."""
