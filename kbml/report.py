"""``kbml report``: one HTML page of the live model monitoring, for a person to open in a browser.

Reads the monitoring metrics the monitoring pipeline wrote to the warehouse
(partial sums, see ``transforms/metrics.py``, whose functions compute every
figure here) and the model store, and writes a single self-contained file
(the plots are PNG images inside it) with:

- the champion and the challenger, with their test-set figures;
- precision, recall, average precision and flagged rate per window and model version;
- the score histogram of each model version;
- the population stability index of each feature and of the score per window, against the training data;
- the live precision-recall curves of the current and the previous model, and the current one's test-set curve;
- the use case's ranking precision per day and model version (fraud: card precision@100).

Everything is about the champion role (the model whose decisions are
published) unless said. The use case (its names of events, positives and
ranked entities) is the one of the model in service, unless ``--use-case``
says. A fresh system has no metrics yet: the page then
says so (run ``kbml monitor``).

Example::

    kbml report && chromium .kbml/report/index.html
"""

import argparse
import base64
import datetime
import html
import io
import os
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from apache_beam.io.filesystems import FileSystems

from kbml.local_state import default_model_dir, local_state_dir
from kbml.warehouse import Warehouse, default_warehouse_url, open_warehouse
from trainer.evaluate import new_figure, save_figure
from trainer.registry import ModelStore, ModelStoreError
from transforms import metrics
from transforms.use_case import UseCase, load_use_case

if TYPE_CHECKING:
  import pandas

NO_METRICS = 'no monitoring metrics yet: run `kbml monitor`'
DEFAULT_PSI_THRESHOLD = 0.2
# The score histograms are kept in 1,000 bins; 50 bars read better.
DISPLAY_SCORE_BINS = 50
TEST_PR_CURVE_FILE = 'pr_curve.png'  # written by `kbml train` into each version's folder
# Beyond this many windows the drift heatmap's cells are too narrow for their values.
MAX_ANNOTATED_WINDOWS = 40
MAX_X_LABELS = 20
MAX_LISTED_DRIFTS = 8

TIME_METRICS = (('precision', 'precision'), ('recall', 'recall'), ('average_precision', 'average precision'),
                ('flagged_rate', 'flagged rate'))
LABELLED_METRICS = ('precision', 'recall', 'average_precision')

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 0 auto; max-width: 1320px; padding: 1em 2em; color: #222; }
h1 { margin-bottom: 0.2em; }
h2 { border-bottom: 1px solid #ccc; margin-top: 1.6em; padding-bottom: 0.2em; }
table { border-collapse: collapse; margin: 0.6em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f2f2f2; }
td.text, th.text { text-align: left; }
figure { margin: 0.8em 0; }
figure img { max-width: 100%; height: auto; }
figcaption { color: #555; font-size: 0.9em; }
.grid { display: grid; grid-template-columns: repeat(2, minmax(0, 1fr)); gap: 0.5em; }
.empty { color: #8a5a00; font-style: italic; }
.meta { color: #555; }
"""


def _escape(value: Any) -> str:
  return html.escape(str(value))


def _missing(value: Any) -> bool:
  return value is None or not np.isfinite(float(value))


def _number(value: Any, digits: int = 3) -> str:
  """A figure for a table; a dash where there is none (no labels yet)."""
  return '—' if _missing(value) else f'{float(value):.{digits}f}'


def _count(value: Any) -> str:
  return '—' if _missing(value) else f'{int(value):,}'


def _png_data_uri(png: bytes) -> str:
  return 'data:image/png;base64,' + base64.b64encode(png).decode('ascii')


def _rendered(figure) -> bytes:
  buffer = io.BytesIO()
  save_figure(figure, buffer)
  return buffer.getvalue()


def _image(png: bytes, alt: str) -> str:
  return f'<img src="{_png_data_uri(png)}" alt="{_escape(alt)}">'


def _figure_html(figure_id: str, content: str, caption: str) -> str:
  return f'<figure id="{figure_id}">{content}<figcaption>{_escape(caption)}</figcaption></figure>'


def _empty(sentence: str) -> str:
  return f'<p class="empty">{_escape(sentence)}</p>'


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], table_id: str, text_columns: int = 1) -> str:
  """An HTML table of already formatted (escaped) cells; the first ``text_columns`` are left-aligned."""

  def cells(tag: str, values: Sequence[str]) -> str:
    return ''.join(f'<{tag}{" class=text" if i < text_columns else ""}>{value}</{tag}>'
                   for i, value in enumerate(values))

  body = ''.join(f'<tr>{cells("td", row)}</tr>' for row in rows)
  return f'<table id="{table_id}"><tr>{cells("th", header)}</tr>{body}</table>'


def _version_colours(versions: Sequence[str]) -> Dict[str, Any]:
  """One colour per model version, the same in every plot."""
  from matplotlib import colormaps
  palette = colormaps['tab10'].colors
  return {version: palette[i % len(palette)] for i, version in enumerate(sorted(versions))}


def _time_axis(axes, first: 'pandas.Timestamp', last: 'pandas.Timestamp'):
  """Dates on the x axis, from the first to the last window of the report (the same in every plot)."""
  import pandas
  from matplotlib import dates
  margin = max((last - first) * 0.05, pandas.Timedelta(hours=1))
  axes.set_xlim(first - margin, last + margin)
  locator = dates.AutoDateLocator(maxticks=8)
  axes.xaxis.set_major_locator(locator)
  axes.xaxis.set_major_formatter(dates.ConciseDateFormatter(locator))
  axes.set_xlabel('window start (UTC)')


class _Metadata:
  """Versions' metadata from the store, each read once; an empty one for a version the store does not have."""

  def __init__(self, store: ModelStore):
    self._store = store
    self._cache: Dict[str, Dict[str, Any]] = {}
    self.missing: List[str] = []

  def __call__(self, version: str) -> Dict[str, Any]:
    if version not in self._cache:
      try:
        self._cache[version] = self._store.metadata(version)
      except ModelStoreError:
        self._cache[version] = {}
        self.missing.append(version)
    return self._cache[version]


def _model_rows(store: ModelStore, metadata_of: _Metadata, use_case: UseCase) -> List[List[str]]:
  """The header's champion and challenger rows: their test-set figures from their metadata."""
  rows = []
  promoted_at = {promotion.version: promotion.promoted_at for promotion in store.promotions()}
  for role, version in (('champion', store.current()), ('challenger', store.challenger())):
    if version is None:
      rows.append([role, 'none', *['—'] * 6])
      continue
    metadata = metadata_of(version)
    test = metadata.get('metrics') or {}
    since = promoted_at.get(version)
    rows.append([role, _escape(version),
                 _escape(datetime.datetime.fromtimestamp(since, datetime.timezone.utc).strftime('%Y-%m-%d %H:%M'))
                 if since else '—',
                 _escape((metadata.get('training') or {}).get('test', '—')),
                 _number(test.get('auc_roc')), _number(test.get('average_precision')),
                 _number(test.get(use_case.ranking_metric)), _number(metadata.get('threshold'))])
  return rows


def _ranking_title(use_case: UseCase) -> str:
  return f'{use_case.ranked_noun} precision@{use_case.ranking_k}'


def _header(warehouse_url: str, store: ModelStore, metadata_of: _Metadata, use_case: UseCase, now: datetime.datetime,
            windows: Optional[Tuple[Any, Any]]) -> str:
  covered = (f'; windows from {windows[0]:%Y-%m-%d %H:%M} to {windows[1]:%Y-%m-%d %H:%M} UTC' if windows else '')
  models = _table(['role', 'version', 'promoted (UTC)', 'test days', 'test AUC ROC', 'test average precision',
                   f'test {_ranking_title(use_case)}', 'threshold'],
                  _model_rows(store, metadata_of, use_case), 'models', text_columns=4)
  return (f'<h1>Model monitoring: {_escape(use_case.name)}</h1>'
          f'<p class="meta">Generated {now:%Y-%m-%d %H:%M:%S} UTC from the warehouse <code>{_escape(warehouse_url)}'
          f'</code> and the model store <code>{_escape(store.root)}</code>{_escape(covered)}.</p>{models}')


def _metrics_over_time(champion: 'pandas.DataFrame', colours: Mapping[str, Any], use_case: UseCase) -> str:
  """Section 2: one plot per metric, one line per model version."""
  images, missing = [], []
  for column, label in TIME_METRICS:
    if champion[column].notna().sum() == 0:
      missing.append(label)
      continue
    figure, axes = new_figure()
    for version, rows in champion.groupby('model_version', sort=True):
      axes.plot(rows['window_start'], rows[column], marker='o', color=colours[version], label=version)
    axes.set(ylabel=label, title=f'{label.capitalize()} per window (champion)')
    if column in LABELLED_METRICS:
      axes.set_ylim(0, 1.02)
    else:
      axes.set_ylim(bottom=0)
    axes.legend(title='model version', fontsize='small')
    _time_axis(axes, champion['window_start'].min(), champion['window_start'].max())
    images.append(_image(_rendered(figure), f'{label} per window and model version'))
  note = (_empty(f'No {", ".join(missing)} yet: they need the labels of the predictions, which arrive after '
                 f'the {use_case.event_noun}.') if missing else '')
  return _figure_html('metrics-over-time', f'<div class="grid">{"".join(images)}</div>{note}',
                      'Each point is one window of the predictions of the model version in service (labelled '
                      'figures: the predictions whose label has arrived).')


def _score_histograms(champion_sums: 'pandas.DataFrame', metadata_of: _Metadata, colours: Mapping[str, Any]) -> str:
  """Section 3: the share of predictions by score, per model version, with its threshold."""
  figure, axes = new_figure()
  edges = np.linspace(0, 1, DISPLAY_SCORE_BINS + 1)
  for version, rows in champion_sums.groupby('model_version', sort=True):
    counts = metrics.histogram(rows, 'score', metrics.SCORE_BINS)
    if not counts.sum():
      continue
    shares = counts.reshape(DISPLAY_SCORE_BINS, -1).sum(axis=1) / counts.sum()
    axes.stairs(shares, edges, color=colours[version], linewidth=1.5,
                label=f'{version} ({int(counts.sum()):,} predictions)')
    threshold = metadata_of(version).get('threshold')
    if threshold is not None:
      axes.axvline(threshold, color=colours[version], linestyle='--', linewidth=1)
  if not axes.get_legend_handles_labels()[0]:
    from matplotlib import pyplot
    pyplot.close(figure)
    return _figure_html('score-histograms', _empty('No scored predictions in the metrics yet.'), 'Score histograms')
  axes.set_yscale('log')
  axes.set(xlabel='score', ylabel='share of predictions (log)', xlim=(0, 1),
           title='Scores per model version (champion; dashed: threshold)')
  axes.legend(fontsize='small')
  figure.set_size_inches(9, 4.8)
  return _figure_html('score-histograms', _image(_rendered(figure), 'score histogram per model version'),
                      f'All windows together, in {DISPLAY_SCORE_BINS} bins of 0.02.')


def _drift(drift: 'pandas.DataFrame', psi_threshold: float, missing_versions: Sequence[str]) -> str:
  """Section 4: a heatmap of PSI, statistics by windows, the cells at or above the alert threshold labelled."""
  missing = (f' The model store has no metadata of version {", ".join(missing_versions)}: no drift for it.'
             if missing_versions else '')
  if drift.empty:
    return _figure_html('drift', _empty('No drift counts yet, or the model versions have no training statistics '
                                        '(feature_statistics and score_statistics in their metadata).' + missing),
                        'Drift per feature')
  columns = sorted(set(zip(drift['window_start'], drift['model_version'], strict=True)))
  statistics = list(dict.fromkeys(drift['statistic']))
  statistics.sort(key=lambda name: name != 'score')  # the score first: its drift is what decisions feel
  psi = np.full((len(statistics), len(columns)), np.nan)
  for row in drift.itertuples():
    psi[statistics.index(row.statistic), columns.index((row.window_start, row.model_version))] = row.psi

  from matplotlib import colormaps, colors
  figure, axes = new_figure()
  figure.set_size_inches(min(16, 8 + 0.35 * len(columns)), 1.6 + 0.28 * len(statistics))
  colour_map = colormaps['YlOrRd'].with_extremes(bad='#e8e8e8')
  top = max(2 * psi_threshold, float(np.nanmax(psi)))
  # Below the threshold in pale colours, above it in strong ones: the threshold is the middle of the scale.
  norm = colors.TwoSlopeNorm(vmin=0, vcenter=psi_threshold, vmax=top)
  image = axes.imshow(np.ma.masked_invalid(psi), aspect='auto', cmap=colour_map, norm=norm, interpolation='nearest')
  bar = figure.colorbar(image, cax=axes.inset_axes([1.02, 0, 0.03, 1]))
  bar.ax.axhline(psi_threshold, color='black', linewidth=2)
  bar.set_ticks([0, psi_threshold / 2, *np.linspace(psi_threshold, top, 5)])
  bar.set_label(f'PSI (alert at {psi_threshold:g})')
  for i, j in zip(*np.nonzero(psi >= psi_threshold), strict=True):
    axes.text(j, i, f'{psi[i, j]:.2f}' if len(columns) <= MAX_ANNOTATED_WINDOWS else '!', ha='center',
              va='center', fontsize=7, color='white')
  several_versions = len({version for _, version in columns}) > 1
  step = max(1, len(columns) // MAX_X_LABELS)
  axes.set_xticks(range(0, len(columns), step))
  axes.set_xticklabels([f'{start:%m-%d %H:%M}' + (f'\n{version}' if several_versions else '')
                        for start, version in columns[::step]], fontsize=7, rotation=90 if several_versions else 45)
  axes.set_yticks(range(len(statistics)))
  axes.set_yticklabels(statistics, fontsize=7)
  axes.set(xlabel='window start (UTC)' + (' and model version' if several_versions else ''),
           title='PSI against the training data (champion)')
  content = _image(_rendered(figure), 'drift per feature and window, population stability index')

  latest_start, latest_version = columns[-1]
  latest = drift[(drift['window_start'] == latest_start) & (drift['model_version'] == latest_version)]
  drifted = latest[latest['psi'] >= psi_threshold].sort_values('psi', ascending=False)
  if drifted.empty:
    summary = f'No statistic at or above {psi_threshold:g} in the latest window ({latest_start:%Y-%m-%d %H:%M}).'
  else:
    listed = [f'{row.statistic} {row.psi:.2f}' for row in drifted.head(MAX_LISTED_DRIFTS).itertuples()]
    more = f' and {len(drifted) - len(listed)} more' if len(drifted) > len(listed) else ''
    summary = (f'At or above {psi_threshold:g} in the latest window ({latest_start:%Y-%m-%d %H:%M}): '
               f'{", ".join(listed)}{more}.')
  return _figure_html('drift', content, summary + missing)


def _labelled_bins(sums: 'pandas.DataFrame') -> Tuple[np.ndarray, np.ndarray]:
  return (metrics.histogram(sums, 'positive_score', metrics.SCORE_BINS),
          metrics.histogram(sums, 'negative_score', metrics.SCORE_BINS))


def _pr_versions(store: ModelStore, champion_sums: 'pandas.DataFrame') -> List[str]:
  """The two most recently promoted versions with labelled predictions (newest first).

  Without a promotion history (another model store), the metrics' newest versions.
  """
  promoted = [promotion.version for promotion in reversed(store.promotions())]
  candidates = list(dict.fromkeys(promoted)) or sorted(set(champion_sums['model_version']), reverse=True)
  chosen = []
  for version in candidates:
    if sum(counts.sum() for counts in _labelled_bins(champion_sums[champion_sums['model_version'] == version])):
      chosen.append(version)
    if len(chosen) == 2:
      break
  return chosen


def _pr_curves(store: ModelStore, champion_sums: 'pandas.DataFrame', colours: Mapping[str, Any],
               use_case: UseCase) -> str:
  """Section 5: the live PR curves of the current and previous model, and the current one's test-set curve."""
  current = store.current()
  versions = _pr_versions(store, champion_sums)
  if not versions:
    live = _figure_html('pr-curves', _empty('No labelled predictions yet: the curves need the labels, which arrive '
                                            f'after the {use_case.event_noun}.'), 'Live precision-recall curves')
  else:
    figure, axes = new_figure()
    for version in versions:
      positive_counts, negative_counts = _labelled_bins(champion_sums[champion_sums['model_version'] == version])
      precision, recall = metrics.precision_recall_curve(positive_counts, negative_counts)
      average_precision = metrics.average_precision(positive_counts, negative_counts)
      role = 'current' if version == current else 'previous'
      # From recall 0, each bin's precision holds up to its recall: the steps average precision sums.
      axes.step(np.concatenate([[0.0], recall]), np.concatenate([precision[:1], precision]), where='pre',
                color=colours.get(version), label=f'{role} {version} (AP {average_precision:.3f}, '
                f'{int(positive_counts.sum()):,} {use_case.positive_noun} of '
                f'{int(positive_counts.sum() + negative_counts.sum()):,})')
    axes.set(xlabel='recall', ylabel='precision', xlim=(0, 1), ylim=(0, 1.02),
             title='Precision-recall, live labelled predictions')
    axes.legend(loc='lower left', fontsize='small')
    note = (f' The current model {current} has no labelled predictions yet.'
            if current and current not in versions else '')
    described = ' and '.join(f'{"the current" if version == current else "the previous"} model {version}'
                             for version in versions)
    live = _figure_html('pr-curves', _image(_rendered(figure), f'live precision-recall curves of {described}'),
                        'All windows of each version in service together, each score bin a threshold.' + note)
  test_curve = FileSystems.join(store.version_dir(current), TEST_PR_CURVE_FILE) if current else None
  if test_curve and FileSystems.exists(test_curve):
    with FileSystems.open(test_curve) as f:
      test = _figure_html('test-pr-curve', _image(f.read(), f'test-set precision-recall curve of {current}'),
                          f'The current model {current} on its test set, when it was trained.')
  else:
    test = _figure_html('test-pr-curve', _empty('The current model has no test-set precision-recall curve in the '
                                                'model store.'), 'Test-set precision-recall curve')
  return f'<div class="grid">{live}{test}</div>'


def _ranking_precision(precision: 'pandas.DataFrame', use_case: UseCase) -> str:
  """Section 6: the ranking precision (fraud: card precision@100) per day and model version."""
  if precision.empty:
    return _empty('No labelled predictions yet.')
  rows = [[_escape(row.day), _escape(row.model_version), _count(row.entities), _number(row.precision_at_k, 2)]
          for row in precision.itertuples()]
  return _table(['day', 'model version', f'{use_case.ranked_noun}s', _ranking_title(use_case)], rows,
                'ranking-precision', text_columns=2)


def _versions_table(sums: 'pandas.DataFrame', use_case: UseCase) -> str:
  """Every model version and role over all windows."""
  totals = metrics.summaries(sums, group_by=('model_version', 'role'))
  windows = sums.groupby(['model_version', 'role'])['window_start'].nunique()
  rows = [[_escape(row.model_version), _escape(row.role), _count(windows[(row.model_version, row.role)]),
           _count(row.predictions), _number(row.flagged_rate, 4), _count(row.labelled), _count(row.positives),
           _number(row.precision), _number(row.recall), _number(row.average_precision)]
          for row in totals.itertuples()]
  return _table(['model version', 'role', 'windows', 'predictions', 'flagged rate', 'labelled', use_case.positive_noun,
                 'precision', 'recall', 'average precision'], rows, 'versions', text_columns=2)


def _page(title: str, body: str) -> str:
  return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_escape(title)}</title>'
          f'<style>{_STYLE}</style></head><body>{body}</body></html>\n')


def render_report(warehouse: Warehouse, store: ModelStore, psi_threshold: float = DEFAULT_PSI_THRESHOLD,
                  metrics_table: str = metrics.METRICS_TABLE,
                  labelled_table: str = metrics.LABELLED_PREDICTIONS_TABLE,
                  now: Optional[datetime.datetime] = None, use_case: Optional[UseCase] = None) -> Tuple[str, bool]:
  """The report page, and whether there were any metrics to report.

  Args:
    warehouse: where the monitoring pipeline writes.
    store: the model store of the versions in the metrics.
    psi_threshold: the population stability index from which drift is alerted.
    metrics_table: the partial sums' table.
    labelled_table: the labelled predictions' table (the ranking precision).
    now: the time the page says it was generated (default: now).
    use_case: the use case of the predictions (default: that of the model in service, else fraud).

  Returns:
    The HTML text and whether the metrics table had rows.
  """
  import pandas
  now = now or datetime.datetime.now(datetime.timezone.utc)
  metadata_of = _Metadata(store)
  use_case = use_case or load_use_case(store.use_case_in_service())
  sums = metrics.read_sums(warehouse, table=metrics_table)
  if sums.empty:
    no_metrics = f'<p class="empty" id="no-metrics">{_escape(NO_METRICS)}</p>'
    page = _page('kbml report: no metrics yet',
                 _header(warehouse.url, store, metadata_of, use_case, now, None) + no_metrics)
    return page, False

  for column in ('window_start', 'window_end'):
    sums[column] = pandas.to_datetime(sums[column], utc=True)
  champion_sums = sums[sums['role'] == metrics.CHAMPION]
  summary = metrics.summaries(sums)
  champion = summary[summary['role'] == metrics.CHAMPION]
  colours = _version_colours(sorted(set(sums['model_version']) | set(store.versions())))
  drift = metrics.window_drift(warehouse, metadata_of, table=metrics_table)
  if not drift.empty:
    drift['window_start'] = pandas.to_datetime(drift['window_start'], utc=True)

  sections = [
      _header(warehouse.url, store, metadata_of, use_case, now,
              (sums['window_start'].min(), sums['window_end'].max())),
      '<h2>Model versions</h2>', _versions_table(sums, use_case),
      '<h2>Metrics over time</h2>',
      _metrics_over_time(champion, colours, use_case) if not champion.empty
      else _figure_html('metrics-over-time', _empty('No champion predictions in the metrics.'), 'Metrics over time'),
      '<h2>Score histograms</h2>', _score_histograms(champion_sums, metadata_of, colours),
      '<h2>Drift per feature</h2>', _drift(drift, psi_threshold, metadata_of.missing),
      '<h2>Precision-recall curves</h2>', _pr_curves(store, champion_sums, colours, use_case),
      f'<h2>{_escape(_ranking_title(use_case)).capitalize()}</h2>',
      _ranking_precision(metrics.ranked_precision_at_k(warehouse, use_case, table=labelled_table), use_case),
  ]
  return _page('kbml report', ''.join(sections)), True


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='kbml report',
      description='Write one HTML page (plots inside) of the live model monitoring: metrics per window and model '
      'version, score histograms, drift per feature, precision-recall curves of the current and previous model, '
      'and the ranking precision per day (fraud: card precision@100). Reads what `kbml monitor` wrote to the '
      'warehouse.')
  parser.add_argument('--use-case', help='fraud, iot or the dotted name of a module of yours that declares a '
                      'USE_CASE (default: the use case of the model in service).')
  parser.add_argument('--warehouse', default=default_warehouse_url(),
                      help='duckdb:///path/file.duckdb or bigquery://PROJECT/DATASET (default: %(default)s).')
  parser.add_argument('--model-dir', default=default_model_dir(),
                      help='The model store, a folder or gs:// prefix (default: %(default)s).')
  parser.add_argument('--output', default=os.path.join(local_state_dir(), 'report', 'index.html'),
                      help='The HTML file to write (default: %(default)s).')
  parser.add_argument('--psi-threshold', type=float, default=DEFAULT_PSI_THRESHOLD,
                      help='Population stability index from which a feature has drifted (default: %(default)s).')
  parser.add_argument('--metrics-table', default=metrics.METRICS_TABLE,
                      help='The monitoring metrics table (default: %(default)s).')
  parser.add_argument('--labelled-table', default=metrics.LABELLED_PREDICTIONS_TABLE,
                      help='The labelled predictions table (default: %(default)s).')
  return parser


def write_report(path: str, page: str) -> str:
  """Writes the page (its folder created); returns its absolute path."""
  path = os.path.abspath(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    f.write(page)
  return path


def run(argv: Optional[List[str]] = None, out: Callable[[str], None] = print) -> int:
  """``kbml report ARGS``: writes the page and prints its path (after a line saying so if there are no metrics)."""
  args = build_parser().parse_args(argv)
  page, has_metrics = render_report(open_warehouse(args.warehouse), ModelStore(args.model_dir), args.psi_threshold,
                                    args.metrics_table, args.labelled_table,
                                    use_case=load_use_case(args.use_case) if args.use_case else None)
  if not has_metrics:
    out(NO_METRICS)
  out(write_report(args.output, page))
  return 0
