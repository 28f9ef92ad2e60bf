"""Honest evaluation: the Fraud Detection Handbook's time-based protocol and its metrics, for any use case.

The protocol (``../shared/FRAUD.md``, chapter 3 of the handbook): train on a
week, skip the label delay, test on the week after. Where the use case says
so (``known_positives_leave_test``: fraud), the test set leaves out the
entities already known positive, the cards known to be compromised: those
with a fraud in the training week and, for each test day, those with a fraud
on a day of the delay period up to the day before (a fraud on day D is known
on day D + delay). Early stopping and the decision threshold use a validation
split taken from the end of the training range, later in time than the rows
the model is fitted on; the test week is used for the final figures only.

Metrics: AUC ROC and average precision (scikit-learn), the ranking metric
per test day (fraud: the handbook's card precision@k, which no library
implements: each card's highest score of the day ranks the card, the
compromised cards among the top k count, and cards detected on earlier days
leave the ranking; the same of machines for IoT), and precision and recall at
the threshold.
"""

import dataclasses
import datetime
from typing import TYPE_CHECKING, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from sklearn import metrics

from trainer.data import utc_day
from transforms.use_case import UseCase

if TYPE_CHECKING:
  import pandas

TEST_DAY_COLUMN = 'test_day'


@dataclasses.dataclass(frozen=True)
class Protocol:
  """The days of one train / delay / test split (each range's days included)."""
  train_start: datetime.date
  train_days: int = 7
  delay_days: int = 7
  test_days: int = 7
  validation_days: int = 2

  def __post_init__(self):
    if not 0 < self.validation_days < self.train_days:
      raise ValueError(f'The validation split ({self.validation_days} days) must be a part of the training range '
                       f'({self.train_days} days).')
    if self.test_days < 1 or self.delay_days < 0:
      raise ValueError('The test range needs at least 1 day and the delay cannot be negative.')

  @classmethod
  def ending_at(cls, last_day: datetime.date, **kwargs) -> 'Protocol':
    """The split whose test range ends on ``last_day`` (the most recent labelled data)."""
    protocol = cls(last_day, **kwargs)
    return dataclasses.replace(protocol, train_start=last_day - (protocol.test_end - protocol.train_start))

  def day(self, offset: int) -> datetime.date:
    return self.train_start + datetime.timedelta(days=offset)

  @property
  def train_end(self) -> datetime.date:
    return self.day(self.train_days - 1)

  @property
  def fit_end(self) -> datetime.date:
    """The last day the model is fitted on; the validation split follows."""
    return self.day(self.train_days - self.validation_days - 1)

  @property
  def test_start(self) -> datetime.date:
    return self.day(self.train_days + self.delay_days)

  @property
  def test_end(self) -> datetime.date:
    return self.day(self.train_days + self.delay_days + self.test_days - 1)

  def describe(self) -> Dict[str, str]:
    return {'train': f'{self.train_start}..{self.fit_end}',
            'validation': f'{self.day(self.train_days - self.validation_days)}..{self.train_end}',
            'delay_days': str(self.delay_days), 'test': f'{self.test_start}..{self.test_end}'}


def prequential_protocols(protocol: Protocol, folds: int) -> List[Protocol]:
  """``protocol`` and the ``folds - 1`` splits before it, each one test range earlier (the handbook's
  prequential validation, chapter 5): the same lengths of training, delay and test, over successive weeks."""
  if folds < 1:
    raise ValueError(f'Prequential evaluation needs at least 1 fold, not {folds}.')
  return [dataclasses.replace(protocol, train_start=protocol.day(-fold * protocol.test_days)) for fold in range(folds)]


def summarized_metrics(use_case: UseCase) -> Tuple[str, str, str]:
  """The test metrics that summaries and prequential folds report: AUC, average precision, the ranking metric."""
  return 'auc_roc', 'average_precision', use_case.ranking_metric


def mean_and_spread(fold_metrics: List[Mapping[str, object]], names: Sequence[str]) -> Dict[str, Dict[str, float]]:
  """The mean and standard deviation over the folds of each metric of ``names``."""
  return {name: {'mean': float(np.mean([m[name] for m in fold_metrics])),
                 'std': float(np.std([m[name] for m in fold_metrics]))} for name in names}


def mean_and_spread_text(summary: Mapping[str, Mapping[str, float]]) -> str:
  """A :func:`mean_and_spread` result as text: each metric's mean (standard deviation), in columns of 15."""
  return ''.join(f"{figures['mean']:>7.3f} ({figures['std']:.3f})" for figures in summary.values())


@dataclasses.dataclass
class Split:
  train: 'pandas.DataFrame'
  validation: 'pandas.DataFrame'
  test: 'pandas.DataFrame'  # entities already known positive removed (fraud); a test_day column (0, 1, ...)


def split(rows: 'pandas.DataFrame', protocol: Protocol, use_case: UseCase) -> Split:
  """Splits labelled rows of ``protocol.train_start`` .. ``protocol.test_end`` (see the module docstring)."""
  import pandas
  days = (rows[use_case.time_column].dt.tz_convert('UTC').dt.floor('D') - utc_day(protocol.train_start)).dt.days
  fit_days = protocol.train_days - protocol.validation_days
  train = rows[(days >= 0) & (days < fit_days)]
  validation = rows[(days >= fit_days) & (days < protocol.train_days)]
  positives = rows[use_case.label_column] == 1
  entity = use_case.key_columns[0]
  known_positive = set(rows.loc[positives & (days >= 0) & (days < protocol.train_days), entity])
  test_days = []
  for test_day in range(protocol.test_days):
    # The labels of the delay period's day before this test day (minus the delay) have arrived by now.
    newly_known = protocol.train_days + test_day - 1
    if newly_known >= protocol.train_days:
      known_positive |= set(rows.loc[positives & (days == newly_known), entity])
    day_rows = rows[days == protocol.train_days + protocol.delay_days + test_day]
    if use_case.known_positives_leave_test:
      day_rows = day_rows[~day_rows[entity].isin(known_positive)]
    test_days.append(day_rows.assign(**{TEST_DAY_COLUMN: test_day}))
  return Split(train, validation, pandas.concat(test_days))


def precision_at_k(test: 'pandas.DataFrame', scores: np.ndarray, use_case: UseCase,
                   k: Optional[int] = None) -> Tuple[float, List[float]]:
  """The ranking metric: the mean over the test days of the precision@k of the use case's ranked entities (fraud:
  the handbook's card precision@k, where a card detected on a day leaves the later days' rankings; a machine
  stays), and each day's value; ``k`` defaults to the use case's."""
  k = k or use_case.ranking_k
  entity, label = use_case.key_columns[0], use_case.label_column
  ranked = test[[entity, TEST_DAY_COLUMN, label]].assign(score=scores)
  detected, per_day = set(), []
  for _, day in ranked.groupby(TEST_DAY_COLUMN, sort=True):
    entities = day.groupby(entity).agg(score=('score', 'max'), positive=(label, 'max'))
    top = entities[~entities.index.isin(detected)].sort_values('score', ascending=False, kind='stable').head(k)
    per_day.append(float(top['positive'].sum()) / k)
    if use_case.known_positives_leave_test:
      detected |= set(top.index[top['positive'] == 1])
  return float(np.mean(per_day)), per_day


def choose_threshold(targets: np.ndarray, scores: np.ndarray) -> float:
  """The score threshold with the best F1 on (validation) data."""
  precision, recall, thresholds = metrics.precision_recall_curve(targets, scores)
  f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
  return float(thresholds[int(np.argmax(f1))]) if len(thresholds) else 0.5


def test_metrics(test: 'pandas.DataFrame', scores: np.ndarray, threshold: float,
                 use_case: UseCase) -> Dict[str, object]:
  """The figures of one model on the test set (the counts named by the use case's nouns: transactions, frauds)."""
  targets = test[use_case.label_column].to_numpy()
  decisions = scores >= threshold
  ranking, per_day = precision_at_k(test, scores, use_case)
  return {
      'auc_roc': float(metrics.roc_auc_score(targets, scores)),
      'average_precision': float(metrics.average_precision_score(targets, scores)),
      use_case.ranking_metric: ranking,
      f'{use_case.ranking_metric}_per_day': per_day,
      'threshold': threshold,
      'precision_at_threshold': float(metrics.precision_score(targets, decisions, zero_division=0)),
      'recall_at_threshold': float(metrics.recall_score(targets, decisions, zero_division=0)),
      use_case.event_noun: len(targets),
      use_case.positive_noun: int(targets.sum()),
  }


def plot_precision_recall(targets: np.ndarray, scores_by_model: Mapping[str, np.ndarray], path: str):
  """PR curves of the models on the same test rows, as a PNG."""
  figure, axes = new_figure()
  for name, scores in scores_by_model.items():
    precision, recall, _ = metrics.precision_recall_curve(targets, scores)
    average_precision = metrics.average_precision_score(targets, scores)
    axes.step(recall, precision, where='post', label=f'{name} (AP {average_precision:.3f})')
  axes.set(xlabel='recall', ylabel='precision', xlim=(0, 1), ylim=(0, 1.02), title='Precision-recall, test set')
  axes.legend(loc='lower left')
  save_figure(figure, path)


def plot_score_histogram(targets: np.ndarray, scores: np.ndarray, threshold: float, path: str, use_case: UseCase):
  """Histograms of the scores of the negative and positive test events, with the threshold, as a PNG."""
  figure, axes = new_figure()
  bins = np.linspace(0, 1, 51)
  axes.hist(scores[targets == 0], bins=bins, alpha=0.6, label='negative', log=True)
  axes.hist(scores[targets == 1], bins=bins, alpha=0.6, label=use_case.positive_noun, log=True)
  axes.axvline(threshold, color='black', linestyle='--', label=f'threshold {threshold:.3f}')
  axes.set(xlabel='score', ylabel=f'{use_case.event_noun} (log)', title='Scores, test set')
  axes.legend()
  save_figure(figure, path)


def new_figure():
  """A matplotlib figure and its axes, drawn for a file."""
  import matplotlib
  matplotlib.use('Agg')  # files only: no display on servers and CI
  from matplotlib import pyplot
  return pyplot.subplots(figsize=(6.4, 4.8))


def save_figure(figure, path: str):
  """Writes ``figure`` to ``path`` (a file name or a binary buffer) and frees it."""
  from matplotlib import pyplot
  figure.tight_layout()
  figure.savefig(path, dpi=100)
  pyplot.close(figure)
