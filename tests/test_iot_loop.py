"""The IoT loop end to end: leaking seals on live readings -> drift alert -> retrain -> promoted model -> recovered
failure alerts.

``kbml loop --use-case iot`` runs here on its own broker with the use case's
loop scenario (60 machines, seals leaking from day 33), its traffic a little
faster and the retrained model followed for 2 days instead of 3.
"""

import pandas as pd
import pytest

from kbml.alerts import DRIFT
from kbml.loop import PHASES, parse_args, run_loop
from trainer.registry import ModelStore
from use_cases.iot.simulator import LOOP_SCENARIO, SimulationConfig


@pytest.mark.timeout(600)  # about 6 minutes on 2 cores; the loop gives up itself after 540 s
def test_leaking_seals_are_alerted_and_a_retrained_model_recovers_the_failure_alerts(own_broker, tmp_path):
  model_dir, warehouse = str(tmp_path / 'models'), f'duckdb://{tmp_path}/warehouse.duckdb'
  result = run_loop(parse_args([
      '--use-case', 'iot', '--rate', '1000', '--retrained-days', '2', '--timeout-s', '540', '--bootstrap-servers',
      own_broker, '--model-dir', model_dir, '--warehouse', warehouse, '--log-dir', str(tmp_path / 'logs')]))

  # The seals start to leak on day 33; the pressure falls over a day and a half, so that day's readings barely
  # move (PSI 0.13 with these numbers): the first window after it is the one that drifts, and none before.
  drift = [alert for alert in result.alerts if alert['kind'] == DRIFT]
  leaks_start = pd.Timestamp(SimulationConfig().start) + pd.Timedelta(days=LOOP_SCENARIO.drift_from_day)
  assert drift, 'the leaks raise drift alerts'
  assert min(pd.Timestamp(alert['window_start']) for alert in drift) == leaks_start + pd.Timedelta(days=1)

  assert result.retrained_version is not None, 'the drift retrain promoted a new model'
  assert ModelStore(model_dir).metadata(result.retrained_version)['retrain']['trigger'] == 'drift'
  raised = [(alert['kind'], alert['window_start'], alert['model_version']) for alert in result.alerts
            if 'window_start' in alert]  # a scorer_lag alert is about no window
  assert len(raised) == len(set(raised)), 'one alert per window, version and kind'

  # The first model never saw a leak: its failure alerts miss nearly all of them. The retrained one learnt them from
  # the drifted days: its recall and precision come back to at least their level before the leaks.
  phases = result.phases.set_index('phase')
  assert list(phases.index) == list(PHASES)
  before, in_drift, retrained = (phases.loc[phase] for phase in PHASES)
  assert in_drift['recall'] < before['recall'] - 0.3
  assert retrained['recall'] >= before['recall'] and retrained['precision'] >= before['precision'] - 0.05
  assert retrained['average_precision'] > in_drift['average_precision']
