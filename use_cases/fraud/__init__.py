"""Credit-card fraud, the flagship use case: transactions, their fraud labels, the handbook's features.

Its parts: ``records`` (the transactions and labels, their schemas and
tables), ``features`` (the handbook's features and 8 more, in the three
forms) and ``simulator`` (the handbook's generator, with a drift scenario).
"""

from transforms.use_case import UseCase
from use_cases.fraud.features import (
  DEFAULT_LABEL_DELAY_DAYS,
  FEATURE_NAMES,
  FEATURES_TABLE,
  HANDBOOK_FEATURES,
  HISTORY_DAYS,
  ComputeFeatures,
  history_span_days,
  snapshot_identity,
  transaction_of_feature_row,
)
from use_cases.fraud.records import LABEL_SCHEMA, LABELS_TABLE, TRANSACTION_SCHEMA, label_row, transaction_record

USE_CASE = UseCase(
    name='fraud',
    event_schema=TRANSACTION_SCHEMA,
    label_schema=LABEL_SCHEMA,
    events_topic='transactions',
    labels_topic='labels',
    id_column='transaction_id',
    time_column='tx_datetime',
    key_columns=('customer_id', 'terminal_id'),
    label_column='is_fraud',
    event_noun='transactions',
    positive_noun='frauds',
    ranked_noun='card',
    ranking_k=100,
    # The handbook's protocol: a card known to be compromised is blocked, so it leaves the test days.
    known_positives_leave_test=True,
    feature_names=FEATURE_NAMES,
    feature_sets={'all': FEATURE_NAMES, 'handbook': HANDBOOK_FEATURES},
    features_table=FEATURES_TABLE,
    labels_table=LABELS_TABLE,
    label_row=label_row,
    event_record=transaction_record,
    event_of_feature_row=transaction_of_feature_row,
    compute_features=ComputeFeatures,
    snapshot_identity=snapshot_identity,
    history_span_days=history_span_days,
    default_label_delay_days=DEFAULT_LABEL_DELAY_DAYS,
    # A transaction older than its customer's longest history changes no feature.
    max_event_lateness_days=HISTORY_DAYS,
    # A day is all weekend or none of it: its calendar decides, not drift.
    drift_exclude=('TX_DURING_WEEKEND',),
    simulator='use_cases.fraud.simulator',
)
