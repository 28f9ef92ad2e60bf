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
  reading_of_feature_row,
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
    key_columns=('machine_id',),
    label_column='fails_within_horizon',
    event_noun='readings',
    positive_noun='failures',
    ranked_noun='machine',
    ranking_k=5,
    # A failed machine is repaired and comes back: it stays in the test days.
    known_positives_leave_test=False,
    feature_names=FEATURE_NAMES,
    feature_sets={'all': FEATURE_NAMES},
    features_table=FEATURES_TABLE,
    labels_table=LABELS_TABLE,
    label_row=label_row,
    event_record=reading_record,
    event_of_feature_row=reading_of_feature_row,
    compute_features=ComputeMachineFeatures,
    snapshot_identity=snapshot_identity,
    history_span_days=history_span_days,
    default_label_delay_days=1.0,  # the simulator's horizon: 24 hours
    # A reading older than a day changes no feature of a later one.
    max_event_lateness_days=HISTORY_HOURS / 24,
    simulator='use_cases.iot.simulator',
)
