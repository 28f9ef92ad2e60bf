"""Beam pipelines: one module per pipeline, each a composite PTransform (IngestEvents, ScoreEvents,
MonitorPredictions, MirrorTopic) with a thin build_pipeline() and run()."""

import sys

# A pipeline started as a program (`python -m pipelines.NAME`; runpy imports this package while sys.argv[0] is
# still '-m') stops cleanly on SIGINT or SIGTERM from its first moment: its imports (Beam, TensorFlow) take
# seconds and start threads, and an interrupt among them could leave the process running (pipelines/stopping.py).
if sys.argv[:1] == ['-m']:
  from pipelines.stopping import stop_on_signals
  stop_on_signals()
