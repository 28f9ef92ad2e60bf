"""IoT predictive maintenance: machines, their sensor readings, and whether each fails within the next hours.

The second use case, declared like the first: readings keyed by machine on
the ``readings`` topic (``records.py``), a label per reading on
``failure-labels`` once the horizon (24 hours by default) has passed, per-machine
rolling features (``features.py``), and a simulator (``simulator.py``).
"""

from transforms.use_case import UseCase
from use_cases.iot.features import (
  FEATURE_NAMES,
  FEATURES_TABLE,
  HISTORY_HOURS,
  ComputeMachineFeatures,
  history_span_days,
  snapshot_identity,
)
from use_cases.iot.records import LABEL_SCHEMA, LABELS_TABLE, READING_SCHEMA, label_row, reading_record

USE_CASE = UseCase(
    name='iot',
    event_schema=READING_SCHEMA,
    label_schema=LABEL_SCHEMA,
    events_topic='readings',
    labels_topic='failure-labels',  # beside fraud's labels on one broker
    id_column='reading_id',
    time_column='reading_time',
    label_column='fails_within_horizon',
    feature_names=FEATURE_NAMES,
    features_table=FEATURES_TABLE,
    labels_table=LABELS_TABLE,
    label_row=label_row,
    event_record=reading_record,
    compute_features=ComputeMachineFeatures,
    snapshot_identity=snapshot_identity,
    history_span_days=history_span_days,
    default_label_delay_days=1.0,  # the simulator's horizon: 24 hours
    # A reading older than a day changes no feature of a later one.
    max_event_lateness_days=HISTORY_HOURS / 24,
)
