"""The whole loop end to end: drift on live traffic -> alert -> retrain -> promoted model -> recovered metrics.

``kbml loop`` runs here as ``make demo`` runs it, on a smaller population and
its own broker (the loop uses the standard topic and group names): history,
ingest and a first model, then the scorer, the monitor, a streaming ingest and
``kbml retrain --on-drift`` as processes while live traffic with a cash-out
wave flows.
"""

import collections

import pandas as pd
import pytest

from kbml import status
from kbml.alerts import DRIFT
from kbml.loop import PHASES, parse_args, run_loop
from trainer.registry import ModelStore
from use_cases.fraud.simulator import SimulationConfig

LIVE_FROM_DAY, DRIFT_FROM_DAY = 82, 84


@pytest.mark.timeout(600)  # 4 to 5 minutes on 2 cores; the loop gives up itself after 540 s
def test_a_cash_out_wave_is_alerted_in_its_first_window_and_a_retrained_model_recovers(own_broker, tmp_path):
  model_dir, warehouse = str(tmp_path / 'models'), f'duckdb://{tmp_path}/warehouse.duckdb'
  args = parse_args([
      '--customers', '300', '--terminals', '600', '--drift-cards-per-day', '24', '--retrained-days', '3',
      '--live-from-day', str(LIVE_FROM_DAY), '--drift-from-day', str(DRIFT_FROM_DAY), '--epochs', '6',
      '--rate', '500', '--timeout-s', '540', '--bootstrap-servers', own_broker, '--model-dir', model_dir,
      '--warehouse', warehouse, '--log-dir', str(tmp_path / 'logs')])
  result = run_loop(args)

  drift = [alert for alert in result.alerts if alert['kind'] == DRIFT]
  wave_start = pd.Timestamp(SimulationConfig().start) + pd.Timedelta(days=DRIFT_FROM_DAY)
  assert drift, 'the wave raises drift alerts'
  assert min(pd.Timestamp(alert['window_start']) for alert in drift) == wave_start, \
      'the first drift alert is about the wave\'s first window, and none comes before it'

  assert result.retrained_version is not None, 'the drift retrain promoted a new model'
  retrain = ModelStore(model_dir).metadata(result.retrained_version)['retrain']
  assert retrain['trigger'] == 'drift'

  phases = result.phases.set_index('phase')
  assert list(phases.index) == list(PHASES)
  before, in_drift, retrained = (phases.loc[phase] for phase in PHASES)
  windows = result.windows
  whole = windows[windows['window_start'].map(windows.groupby('window_start')['model_version'].nunique()) == 1]
  retrained_labelled = whole[(whole['model_version'] == result.retrained_version)
                             & (whole['labelled'] == whole['predictions'])]
  assert len(retrained_labelled) >= 3, 'the traffic went on until the retrained model had scored 3 whole days ' \
      'and their labels were in'
  # The first model misses most of the wave; the retrained one catches it. Average precision (precision over
  # every threshold) and recall recover to at least their level before the wave; the precision at the new
  # model's own threshold, which it picks on validation days, comes back near its level before the wave.
  assert in_drift['recall'] < before['recall'] - 0.2
  assert retrained['recall'] > in_drift['recall'] + 0.3 and retrained['recall'] >= before['recall']
  assert retrained['average_precision'] > in_drift['average_precision'] + 0.1
  assert retrained['average_precision'] >= before['average_precision']
  assert retrained['precision'] >= before['precision'] - 0.1

  # Alerts people read: one per window, version and kind; a drift alert stays open while the next windows drift,
  # so no version has drift alerts in two adjacent windows; `kbml status` lists each alert once.
  raised = [(alert['kind'], alert['window_start'], alert['model_version']) for alert in result.alerts
            if 'window_start' in alert]  # a scorer_lag alert is about no window
  assert len(raised) == len(set(raised))
  day = pd.Timedelta(days=1)
  for version in {alert['model_version'] for alert in drift}:
    starts = sorted(pd.Timestamp(alert['window_start']) for alert in drift if alert['model_version'] == version)
    assert all(later - earlier > day for earlier, later in zip(starts, starts[1:], strict=False)), starts
  listed = status.collect(status.build_parser().parse_args([
      '--bootstrap-servers', own_broker, '--model-dir', model_dir, '--warehouse', warehouse, '--sample-s', '0']))
  assert listed['alerts']['complete'] and listed['alerts']['total'] == len(result.alerts)
  assert listed['alerts']['by_kind'] == dict(collections.Counter(alert['kind'] for alert in result.alerts))
