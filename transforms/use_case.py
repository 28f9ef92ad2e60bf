"""What a use case declares, and how the engine finds one by name.

A use case is one package (``use_cases/fraud/``, ``use_cases/iot/``, or a
module of your own) whose ``USE_CASE`` is a :class:`UseCase`: its event and
label records, the columns that name and time an event, its features and its
tables. The pipelines take one (``--use-case fraud|iot|package.module``) and
know nothing else of it.
"""

import dataclasses
import importlib
from typing import Callable, Dict, Mapping, Optional, Sequence

import apache_beam as beam

from kbml.warehouse import TableSchema
from transforms.kafka_io import KafkaRecord
from transforms.records import RecordSchema

DEFAULT_USE_CASE = 'fraud'
BUILT_IN_PACKAGE = 'use_cases'


@dataclasses.dataclass(frozen=True)
class UseCase:
  """A use case: what its events are, what is learnt from them, and where it is kept.

  Attributes:
    name: how ``--use-case`` names it.
    event_schema: the records of the events topic; a valid one becomes an event row (a NamedTuple whose last
      fields are its Kafka partition and offset, ``kafka_partition`` and ``kafka_offset``).
    label_schema: the records of the labels topic; a label row's time field is its event's time.
    events_topic: the events topic's default name.
    labels_topic: the labels topic's default name.
    id_column: the column, and the event rows' field, that names an event (its label's too).
    time_column: the column of an event's time in the tables (ISO-8601 UTC).
    key_columns: the columns of the entities an event is about, in both tables (fraud: the customer, i.e. the
      card, and the terminal); the first is the one the evaluation ranks (see ``ranking_k``).
    label_column: the labels table's column the models learn (0 or 1).
    event_noun: what an event is called in messages and metrics (plural: ``transactions``).
    positive_noun: what a positive label is called (plural: ``frauds``).
    ranked_noun: what the first key column names (``card``): the ranking metric is its precision at k.
    ranking_k: each test day, the entities with the highest scores (each its highest of the day) that the
      ranking metric takes: ``{ranked_noun}_precision_at_{ranking_k}``, the share of them with a positive label.
    known_positives_leave_test: whether an entity with a positive label known by a test day leaves that day's
      test rows, and one the ranking found positive the later days' rankings (a card known to be compromised is
      blocked; a machine is repaired and comes back).
    feature_names: the features the models take, in order.
    feature_sets: the feature sets ``kbml train --feature-set`` chooses from, by name (``all``: feature_names).
    features_table: the warehouse table of events and their features (keyed by ``id_column``).
    labels_table: the warehouse table of labels.
    label_row: a label row -> its row in the labels table.
    event_record: (an event row, its topic) -> the Kafka record it was read from, for a dead letter about it.
    event_of_feature_row: a features table row -> the event row it was computed from, Kafka partition and offset
      included (a row that could not be scored goes to the dead letters as its event's record).
    compute_features: (label delay in days, form, rows per batch or None, snapshots or None) -> the PTransform
      from event and label rows to a :class:`~transforms.feature_forms.FeatureOutputs` (feature rows as dicts of the
      features table's columns, and the repeated events), in each form of :data:`~transforms.feature_forms.FORMS`.
    snapshot_identity: (label delay in days, events topic, labels topic) -> what a snapshot of the feature
      histories depends on; the ``streams`` entry maps each event row type's name to its topic.
    history_span_days: (label delay in days) -> how long before an event lie the events its features use.
    default_label_delay_days: how long after an event its label comes, by default.
    max_event_lateness_days: an event produced more than this many days after its time is a dead letter.
    drift_exclude: the statistics that monitoring does not check for drift by default.
    simulator: the dotted name of its simulator module, for ``kbml simulate`` (what it provides:
      ``kbml/simulate.py``); None: it has none.
  """
  name: str
  event_schema: RecordSchema
  label_schema: RecordSchema
  events_topic: str
  labels_topic: str
  id_column: str
  time_column: str
  key_columns: Sequence[str]
  label_column: str
  event_noun: str
  positive_noun: str
  ranked_noun: str
  ranking_k: int
  known_positives_leave_test: bool
  feature_names: Sequence[str]
  feature_sets: Mapping[str, Sequence[str]]
  features_table: TableSchema
  labels_table: TableSchema
  label_row: Callable[[tuple], Dict[str, object]]
  event_record: Callable[[tuple, str], KafkaRecord]
  event_of_feature_row: Callable[[Dict[str, object]], tuple]
  compute_features: Callable[..., beam.PTransform]
  snapshot_identity: Callable[[float, str, str], Mapping[str, object]]
  history_span_days: Callable[[float], float]
  default_label_delay_days: float
  max_event_lateness_days: float
  drift_exclude: Sequence[str] = ()
  simulator: Optional[str] = None

  def is_label(self, row) -> bool:
    """Whether a parsed row is a label (else an event)."""
    return isinstance(row, self.label_schema.row_type)

  @property
  def ranking_metric(self) -> str:
    """The name of the ranking metric among the test metrics (``card_precision_at_100``)."""
    return f'{self.ranked_noun}_precision_at_{self.ranking_k}'

  @property
  def ranking_abbreviation(self) -> str:
    """The ranking metric in a summary line (``CP@100``)."""
    return f'{self.ranked_noun[0].upper()}P@{self.ranking_k}'


def load_use_case(name: Optional[str] = None) -> UseCase:
  """The use case ``name``: a built-in one (``fraud``, ``iot``) or the dotted name of a module with a ``USE_CASE``;
  None: the default, fraud.

  Raises:
    ValueError: no such module, or it declares no :class:`UseCase`.
  """
  name = name or DEFAULT_USE_CASE
  module_name = name if '.' in name else f'{BUILT_IN_PACKAGE}.{name}'
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    if e.name is None or not module_name.startswith(e.name):
      raise
    raise ValueError(f'Unknown use case {name!r}: no module {module_name} (built in: fraud, iot; or the dotted '
                     'name of a module of yours that declares USE_CASE)') from None
  use_case = getattr(module, 'USE_CASE', None)
  if not isinstance(use_case, UseCase):
    raise ValueError(f'The module {module_name} declares no USE_CASE (a transforms.use_case.UseCase).')
  return use_case
