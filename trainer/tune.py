"""Searches a model family's settings on validation weeks, never on the test range (Optuna).

``kbml train --tune-trials N`` (or ``--tune-seconds S``) runs, for each family
of ``--model-family``, a search of that family's settings before the final
fit. A trial's figure is the mean average precision over validation splits
laid out as the handbook lays out model selection (its chapter 5): the named
split moved back by its delay and test range, so that the first validation
test range is the named training range, whose labels are known when the model
is trained; then one test range earlier for each further week. The settings
given on the command line are the first trial, so a search keeps them unless
another trial does better on those weeks.
"""

import dataclasses
import time
from typing import Callable, Dict, List, Mapping, Optional

from trainer.evaluate import Protocol, prequential_protocols

DEFAULT_TUNE_WEEKS = 3


def validation_protocols(protocol: Protocol, weeks: int = DEFAULT_TUNE_WEEKS) -> List[Protocol]:
  """The validation splits of ``protocol``: the first tests on its training range, each further one a test range
  earlier; none reaches its delay or test range."""
  moved_back = dataclasses.replace(protocol, train_start=protocol.day(-(protocol.delay_days + protocol.test_days)))
  return prequential_protocols(moved_back, weeks)


HIDDEN_UNITS_CHOICES = ('64,32', '128,64', '256,128', '128,64,32')
# What a search may change for each family (`kbml train` settings, argparse destinations) and where: a choice
# among strings, a range of integers, or a range of floats searched on a log scale.
SEARCH_RANGES = {
    'keras': {'hidden_units': HIDDEN_UNITS_CHOICES, 'learning_rate': (1e-4, 1e-2), 'positive_weight': (1.0, 10.0)},
    'trees': {'tree_depth': (2, 8), 'tree_learning_rate': (0.01, 0.3)},
    'forest': {'forest_depth': (6, 16), 'forest_trees': (25, 200)},
}
SEARCHED_SETTINGS = {family: tuple(ranges) for family, ranges in SEARCH_RANGES.items()}


def search_space(family: str, given: Mapping[str, object]) -> Dict[str, object]:
  """The Optuna distributions of ``family``'s SEARCH_RANGES, each widened to hold its ``given`` value."""
  from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
  space = {}
  for name, values in SEARCH_RANGES[family].items():
    value = given[name]
    if isinstance(values[0], str):
      space[name] = CategoricalDistribution(sorted({*values, value}))
    elif isinstance(values[0], int):
      space[name] = IntDistribution(min(values[0], value), max(values[1], value))
    else:
      space[name] = FloatDistribution(min(values[0], value), max(values[1], value), log=True)
  return space


@dataclasses.dataclass
class Search:
  """What a search of one family's settings tried and found."""
  family: str
  given: Dict[str, object]  # the settings it started from (its first trial)
  given_average_precision: float
  best: Dict[str, object]
  best_average_precision: float
  trials: int
  seconds: float

  def describe(self) -> Dict[str, object]:
    return {name: (round(value, 4) if isinstance(value, float) else value)
            for name, value in dataclasses.asdict(self).items()}


def settings_text(settings: Mapping[str, object]) -> str:
  """Settings as 'name value, ...', floats to 4 significant digits."""
  return ', '.join(f'{name} {value:.4g}' if isinstance(value, float) else f'{name} {value}'
                   for name, value in settings.items())


def search(family: str, validation_average_precision: Callable[[Dict[str, object]], float],
           given: Dict[str, object], trials: Optional[int], seconds: Optional[float], seed: int = 0) -> Search:
  """Searches ``family``'s settings for the best mean validation average precision (Optuna's TPE sampler).

  Args:
    family: a key of SEARCH_RANGES.
    validation_average_precision: fits the family with the settings it is given laid over the command line's
      and returns its mean average precision on the validation splits.
    given: the command line's values of the family's SEARCHED_SETTINGS, tried first.
    trials: at most this many trials (None: no limit but ``seconds``).
    seconds: no trial starts after this long (None: no limit but ``trials``).
    seed: the sampler's seed.
  """
  import optuna
  if not trials and not seconds:
    raise ValueError('A search needs a budget: a number of trials or of seconds.')
  optuna.logging.set_verbosity(optuna.logging.WARNING)
  study = optuna.create_study(direction='maximize', sampler=optuna.samplers.TPESampler(seed=seed))
  study.enqueue_trial(given)
  space = search_space(family, given)
  started = time.monotonic()
  while (not trials or len(study.trials) < trials) and not (seconds and time.monotonic() - started >= seconds):
    trial = study.ask(space)
    figure = validation_average_precision(dict(trial.params))
    study.tell(trial, figure)
    print(f'tuning {family}, trial {len(study.trials)}{f" of {trials}" if trials else ""}: '
          f'{settings_text(trial.params)} -> validation average precision {figure:.4f} '
          f'(best {study.best_value:.4f})', flush=True)
  first = study.trials[0]
  return Search(family, dict(first.params), first.value, dict(study.best_params), study.best_value,
                len(study.trials), time.monotonic() - started)
