"""``kbml report`` on a real warehouse and model store, rendered by headless Chromium."""

import base64
import datetime
import html.parser
import io
import os
import subprocess

import numpy as np
from matplotlib import image

from kbml import report
from kbml.warehouse import open_warehouse
from tests.conftest import CHROMIUM
from tests.scoring_models import publish_model
from trainer import evaluate
from trainer.data import feature_statistics
from trainer.registry import ModelStore
from transforms import metrics
from transforms.records import utc_iso
from transforms.use_case import load_use_case
from use_cases.fraud.features import FEATURE_NAMES

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
WINDOW_WIDTH, WINDOW_HEIGHT = 1400, 4000
FIGURES = ('metrics-over-time', 'score-histograms', 'drift', 'pr-curves', 'test-pr-curve')
DAY = 86400.0
FIRST_DAY = datetime.datetime(2018, 6, 1, tzinfo=datetime.timezone.utc).timestamp()
PREDICTIONS_PER_WINDOW = 300
FRAUD = load_use_case('fraud')
FRAUD_RATE = 0.1


class _Figures(html.parser.HTMLParser):
  """The images of each <figure id=...> of a page: figure id -> [(alt, src)]."""

  def __init__(self):
    super().__init__()
    self.images = {}
    self._figure = None

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    if tag == 'figure':
      self._figure = attrs.get('id')
      self.images.setdefault(self._figure, [])
    elif tag == 'img' and self._figure:
      self.images[self._figure].append((attrs.get('alt'), attrs.get('src')))

  def handle_endtag(self, tag):
    if tag == 'figure':
      self._figure = None


def _scores(rng, is_fraud: np.ndarray) -> np.ndarray:
  """Scores of a model that tells frauds apart fairly well."""
  return np.where(is_fraud, rng.beta(5, 2, size=is_fraud.shape), rng.beta(1, 6, size=is_fraud.shape))


def _statistics(rng, rows: int = 500):
  features = rng.normal(size=(rows, len(FEATURE_NAMES)))
  scores = _scores(rng, rng.random(rows) < FRAUD_RATE)
  return (feature_statistics(features, FEATURE_NAMES),
          feature_statistics(scores[:, None], ['score'])['score'])


def _model_store(model_dir: str, rng) -> ModelStore:
  """Two promoted versions with training statistics and test figures; the current one has a test PR curve."""
  store = ModelStore(model_dir)
  for seed in (0, 1):
    version = publish_model(model_dir, seed=seed, threshold=0.3 + 0.1 * seed)
    features, score = _statistics(rng)
    store.update_metadata(version, feature_statistics=features, score_statistics=score,
                          metrics={'auc_roc': 0.85 + seed / 100, 'average_precision': 0.6 + seed / 100,
                                   'card_precision_at_100': 0.2 + seed / 100},
                          training={'test': '2018-05-13..2018-05-19'})
  targets = rng.random(400) < FRAUD_RATE
  evaluate.plot_precision_recall(targets, {'this model': _scores(rng, targets)},
                                 os.path.join(store.version_dir(store.current()), report.TEST_PR_CURVE_FILE))
  return store


def _monitoring_data(warehouse, store: ModelStore, rng):
  """Three daily windows: the previous model in service, then both (a promotion that day), then the current one.

  The current model's inputs move away from the training data on the last day: drift.
  """
  previous, current = (promotion.version for promotion in store.promotions())
  in_service = {0: [previous], 1: [previous, current], 2: [current]}
  sums, labelled, transaction_id = {}, [], 0
  for day, versions in in_service.items():
    start = FIRST_DAY + day * DAY
    for version in versions:
      metadata = store.metadata(version)
      distributions = metrics.training_distributions(metadata)
      window = sums.setdefault((start, start + DAY, version, metrics.CHAMPION), {})
      for _ in range(PREDICTIONS_PER_WINDOW // len(versions)):
        is_fraud = bool(rng.random() < FRAUD_RATE)
        score = float(_scores(rng, np.array(is_fraud)))
        flagged = score >= metadata['threshold']
        shift = 1.5 if day == 2 else 0.0
        drift_bins = {name: metrics.statistic_bin(rng.normal(shift), distribution['bin_edges'])
                      for name, distribution in distributions.items() if name != 'score'}
        drift_bins['score'] = metrics.statistic_bin(score, distributions['score']['bin_edges'])
        metrics.add_sums(window, metrics.prediction_sums(score, flagged, drift_bins))
        if day < 2:  # the last day's labels have not arrived yet
          metrics.add_sums(window, metrics.labelled_sums(score, flagged, is_fraud))
          labelled.append({'transaction_id': transaction_id, 'tx_datetime': utc_iso(start + rng.random() * DAY),
                           'customer_id': int(rng.integers(200)), 'model_version': version,
                           'role': metrics.CHAMPION, 'score': score, 'flagged': int(flagged),
                           'is_fraud': int(is_fraud)})
        transaction_id += 1
  warehouse.write_rows(metrics.METRICS_TABLE, metrics.METRICS_SCHEMA,
                       metrics.metric_rows(sums, 'test-part', utc_iso(FIRST_DAY + 3 * DAY)))
  warehouse.write_rows(metrics.LABELLED_PREDICTIONS_TABLE, metrics.labelled_predictions_schema(FRAUD), labelled)


def _screenshot(page: str, folder) -> np.ndarray:
  """Chromium's rendering of a local HTML file, checked to be a PNG of the window's size."""
  path = folder / 'report.png'
  subprocess.run([CHROMIUM, '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                  '--disable-background-networking', '--disable-component-update', '--disable-sync',
                  f'--user-data-dir={folder / "chromium-profile"}', f'--window-size={WINDOW_WIDTH},{WINDOW_HEIGHT}',
                  f'--screenshot={path}', f'file://{page}'], check=True, capture_output=True, timeout=60)
  data = path.read_bytes()
  assert data[:8] == PNG_MAGIC
  width, height = int.from_bytes(data[16:20], 'big'), int.from_bytes(data[20:24], 'big')  # the IHDR chunk
  assert (width, height) == (WINDOW_WIDTH, WINDOW_HEIGHT)
  return image.imread(io.BytesIO(data), format='png')


def test_the_report_renders_its_plots(tmp_path, capsys):
  rng = np.random.default_rng(7)
  store = _model_store(str(tmp_path / 'models'), rng)
  warehouse_url = f'duckdb://{tmp_path}/w.duckdb'
  _monitoring_data(open_warehouse(warehouse_url), store, rng)
  output = tmp_path / 'report' / 'index.html'

  assert report.run(['--warehouse', warehouse_url, '--model-dir', str(tmp_path / 'models'),
                     '--output', str(output)]) == 0

  assert capsys.readouterr().out.strip() == str(output)
  page = output.read_text()
  figures = _Figures()
  figures.feed(page)
  for figure in FIGURES:
    assert figures.images.get(figure), f'figure {figure} has no image'
    for alt, source in figures.images[figure]:
      assert alt and source.startswith('data:image/png;base64,')
      assert base64.b64decode(source.split(',', 1)[1])[:8] == PNG_MAGIC
  assert len(figures.images['metrics-over-time']) == 4  # precision, recall, average precision, flagged rate
  previous, current = (promotion.version for promotion in store.promotions())
  assert figures.images['pr-curves'][0][0] == (f'live precision-recall curves of the current model {current} '
                                               f'and the previous model {previous}')
  drifted = page.split('At or above 0.2 in the latest window (2018-06-03 00:00): ')[1].split('.<')[0]
  assert drifted.endswith(f'and {len(FEATURE_NAMES) - report.MAX_LISTED_DRIFTS} more')  # every feature moved
  assert 'score' not in drifted  # the scores did not
  assert 'card precision@100' in page and report.NO_METRICS not in page

  pixels = _screenshot(str(output), tmp_path)
  rgb = (pixels[..., :3] * 255).astype(np.uint8).reshape(-1, 3)
  assert len(np.unique(rgb, axis=0)) > 1000  # plots: many colours, not a blank or text-only page
  assert (rgb < 235).any(axis=1).mean() > 0.05


def test_a_fresh_system_gets_a_page_that_says_there_are_no_metrics(tmp_path, capsys):
  output = tmp_path / 'report.html'

  assert report.run(['--warehouse', f'duckdb://{tmp_path}/empty.duckdb', '--model-dir', str(tmp_path / 'models'),
                     '--output', str(output)]) == 0

  assert capsys.readouterr().out.splitlines() == [report.NO_METRICS, str(output)]
  page = output.read_text()
  assert report.NO_METRICS in page
  assert '<img' not in page
