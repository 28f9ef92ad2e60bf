"""Scoring feature rows with the model store's versions in Beam's RunInference.

:class:`ModelStoreHandler` is a RunInference model handler for the versions
of a model store (``trainer/registry.py``). It loads a version only after
checking its file against the size and checksum of its metadata, and scores
feature rows with the version's network, features and threshold. Which
version it serves:

- at load time, the store's ``current`` pointer;
- with ``poll_s``, the pointer read again every ``poll_s`` seconds while
  scoring: how the local runner takes a new model without a restart (its
  unbounded runs never deliver a side input, DESIGN.md). A newly promoted
  version loads in a background thread while the one in service goes on
  scoring (loading stalled the scorer for a second);
- given a promotion record through RunInference's side input
  (``model_metadata_pcoll``: WatchFilePattern on the promotion records on
  Dataflow and Flink, the promotion history in a backtest), that record's
  version.

With ``shadow_poll_s``, the store's ``challenger`` pointer is read that
often too, and a challenger version scores every row in the champion's
shadow: its score is recorded with the prediction, the champion's decision
is the one published (the shadow deployment of a challenger).

A version that fails its check (truncated, corrupt, not loadable) is
refused: the version in service keeps scoring, and one ``model_refused``
alert is sent for it.

A worker runs several threads, each with its own copy of the handler (one
per DoFn instance) and all with one model (RunInference's shared model).
The versions are loaded, and refused, once per process: by the process-wide
loader of the store (one per ``model_dir``), in its own thread. The shared
model holds an immutable snapshot of what scores (the champion and its
challenger), which the thread that reads the store replaces whole, so that a
batch is scored by the versions of one moment.
"""

import bisect
import concurrent.futures
import logging
import math
import threading
import time
from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

import apache_beam as beam
import numpy as np
from apache_beam.coders.coders import IntervalWindowCoder
from apache_beam.ml.inference.base import ModelHandler, ModelMetadata, PredictionResult
from apache_beam.transforms.window import IntervalWindow, NonMergingWindowFn
from apache_beam.utils.timestamp import MAX_TIMESTAMP, MIN_TIMESTAMP, Timestamp

from kbml.alerts import MODEL_REFUSED, AlertSink
from trainer.registry import ModelStore, ModelStoreError

_LOG = logging.getLogger(__name__)

# Loaded versions kept for reuse: a backtest's periods may come in any order; the local runner holds one.
_LOADED_VERSIONS = 3


class ScoringModel(NamedTuple):
  """A loaded version: its network, and the features and threshold it was trained with."""
  network: Any
  version: str
  threshold: float
  feature_names: Tuple[str, ...]


class ShadowScore(NamedTuple):
  """A challenger's score of a row: recorded beside the champion's, never acted on."""
  version: str
  score: float
  flagged: bool


class Score(NamedTuple):
  """The inference of one row: the score, the decision at the model's threshold, and when it was made."""
  score: float
  flagged: bool
  threshold: float
  scored_at: float
  challenger: Optional[ShadowScore] = None


class _Serving(NamedTuple):
  """What scores now: the champion and its challenger, and when to read the store again; replaced, never changed."""
  scoring: ScoringModel
  challenger: Optional[ScoringModel]
  check_at: float


class _ModelInService:
  """What RunInference holds as the model, shared by a worker's threads: the snapshot that scores now.

  One thread at a time (the holder of ``following``) reads the store and
  replaces ``serving``; the others go on scoring with the snapshot they read.
  """

  def __init__(self, serving: _Serving):
    self.serving = serving
    self.following = threading.Lock()


class _StoreVersions:
  """A store's versions as this process loads them: each loaded, or refused, once for every handler of the store.

  Loads run one at a time in a thread of their own. A loaded version is
  kept for reuse (the last few), a refused one for good, with the reason.

  Args:
    store: the model store.
  """

  def __init__(self, store: ModelStore):
    self._store = store
    self._lock = threading.Lock()
    self._loaded: Dict[str, ScoringModel] = {}
    self._loading: Dict[str, concurrent.futures.Future] = {}
    self._refused: Dict[str, str] = {}
    self._loader: Optional[concurrent.futures.ThreadPoolExecutor] = None

  def get(self, version: str, in_service: Optional[str], alerts: Optional[AlertSink],
          wait: bool) -> Optional[ScoringModel]:
    """The version loaded, starting its load if none has; None if it is refused, or still loading and not ``wait``.

    Args:
      version: the version wanted.
      in_service: the version that keeps scoring if this one is refused (for the alert).
      alerts: where the refusal's alert goes.
      wait: wait for the load to end.
    """
    with self._lock:
      if version in self._loaded:
        return self._loaded[version]
      if version in self._refused:
        return None
      loading = self._loading.get(version)
      if loading is None:
        if self._loader is None:
          self._loader = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix='ModelLoader')
        loading = self._loading[version] = self._loader.submit(self._load_or_refuse, version, in_service, alerts)
    return loading.result() if wait or loading.done() else None

  def refused(self, version: str) -> bool:
    with self._lock:
      return version in self._refused

  def refuse(self, version: str, reason: str, in_service: Optional[str], alerts: Optional[AlertSink]):
    """Refuses a version (or a promotion record) and sends its alert, unless it was refused already."""
    with self._lock:
      if version in self._refused:
        return
      self._refused[version] = reason
    self._alert_refusal(version, reason, in_service, alerts)

  def _alert_refusal(self, version: str, reason: str, in_service: Optional[str], alerts: Optional[AlertSink]):
    message = (f'Model version {version} was promoted but is refused: {reason} '
               f'Version {in_service} keeps scoring.' if in_service else
               f'Model version {version} was promoted but is refused: {reason}')
    if alerts is None:
      _LOG.error(message)
    else:
      alerts.send(MODEL_REFUSED, message, version=version, reason=reason, version_in_service=in_service,
                  model_dir=self._store.root)

  def reason_refused(self, version: str) -> str:
    with self._lock:
      return self._refused[version]

  def _load_or_refuse(self, version: str, in_service: Optional[str],
                      alerts: Optional[AlertSink]) -> Optional[ScoringModel]:
    try:
      metadata = self._store.metadata(version)
      network = self._store.load_model(version)
      scoring = ScoringModel(network, version, float(metadata['threshold']), tuple(metadata['features']))
      _prepare_predict_function(scoring)
    except ModelStoreError as e:
      with self._lock:  # refused as it stops loading: asked meanwhile, it would load again
        del self._loading[version]
        self._refused[version] = str(e)
      self._alert_refusal(version, str(e), in_service, alerts)
      return None
    except BaseException:
      with self._lock:  # asked again, it loads again
        del self._loading[version]
      raise
    with self._lock:
      while len(self._loaded) >= _LOADED_VERSIONS:
        del self._loaded[next(iter(self._loaded))]
      self._loaded[version] = scoring
      del self._loading[version]
    _LOG.info('model version %s loaded from %s (threshold %.4f)', version, self._store.root, scoring.threshold)
    return scoring


def _prepare_predict_function(scoring: ScoringModel):
  # Keras traces its predict function on the first batch and again on the first of another size (about 0.1 s each),
  # then serves any size: done here, in the loader, rather than by the first batches the version scores.
  for rows in (1, 2):
    scoring.network.predict_on_batch(np.zeros((rows, len(scoring.feature_names)), dtype=np.float32))


# One _StoreVersions per model store in this process, for every handler of it, for the process's lifetime.
_VERSIONS_OF_STORES: Dict[str, _StoreVersions] = {}
_VERSIONS_OF_STORES_LOCK = threading.Lock()


def _versions_of(store: ModelStore) -> _StoreVersions:
  with _VERSIONS_OF_STORES_LOCK:
    if store.root not in _VERSIONS_OF_STORES:
      _VERSIONS_OF_STORES[store.root] = _StoreVersions(store)
    return _VERSIONS_OF_STORES[store.root]


def check_features(row: Dict[str, Any], feature_names: Sequence[str], id_column: str) -> Dict[str, Any]:
  """Passes a feature row whose features are all finite numbers; raises ValueError otherwise.

  Checked before RunInference (``pipelines/scoring.py``): a row that fails
  goes to the dead letters alone, where a failed batch would take its
  neighbours along.

  Args:
    row: a row of the use case's features table.
    feature_names: the features checked.
    id_column: the row's field that names its event (in the error).
  """
  bad = [name for name in feature_names if not math.isfinite(row[name])]
  if bad:
    raise ValueError(f'{id_column} {row[id_column]} has non-finite features: '
                     + ', '.join(f'{name}={row[name]}' for name in bad))
  return row


class ModelStoreHandler(ModelHandler[Dict[str, Any], PredictionResult, _ModelInService]):
  """Scores feature rows (dicts with the features by name) with the model store's versions.

  Each result is a ``PredictionResult(example=row, inference=Score,
  model_id=version)``.

  Args:
    model_dir: the model store (a local folder or ``gs://`` prefix).
    poll_s: read the ``current`` pointer this often while scoring, and swap
      to a newly promoted version; None: only when a model is loaded.
    alerts: where ``model_refused`` alerts go; None: logged only.
    shadow_poll_s: read the ``challenger`` pointer this often, and score
      every row with the challenger too; None: no challenger.
    min_batch_size: the least rows RunInference batches together (a
      bundle's last batch may have fewer); None: ``max_batch_size``.
    max_batch_size: the most.
  """

  def __init__(self, model_dir: str, *, poll_s: Optional[float] = None, alerts: Optional[AlertSink] = None,
               shadow_poll_s: Optional[float] = None, min_batch_size: Optional[int] = None,
               max_batch_size: int = 1024):
    super().__init__()
    self._store = ModelStore(model_dir)
    self._poll_s = poll_s
    self._shadow_poll_s = shadow_poll_s
    self._alerts = alerts
    self._batching = {'min_batch_size': min_batch_size or max_batch_size, 'max_batch_size': max_batch_size}
    self._promotion_path: Optional[str] = None
    self._in_service: Optional[ScoringModel] = None

  def _versions(self) -> _StoreVersions:
    return _versions_of(self._store)

  def update_model_path(self, model_path: Optional[str] = None):
    """Serves the version of this promotion record (RunInference's side input)."""
    self._promotion_path = model_path or None

  def load_model(self) -> _ModelInService:
    versions = self._versions()
    in_service = self._in_service.version if self._in_service else None
    try:
      version = (self._store.promotion(self._promotion_path).version if self._promotion_path
                 else self._store.current())
    except ModelStoreError as e:
      version = None
      versions.refuse(self._promotion_path, str(e), in_service, self._alerts)
    if version is None and self._in_service is None:
      raise ModelStoreError(f'No model is in service in {self._store.root}: train one (`kbml train`), '
                            'which promotes it, or promote one (`kbml promote VERSION`).')
    scoring = versions.get(version, in_service, self._alerts, wait=True) if version is not None else None
    if scoring is None:
      if self._in_service is None:
        raise ModelStoreError(f'The model in service, version {version}, was refused '
                              f'({versions.reason_refused(version)}) and no earlier version has been loaded. '
                              'Promote a sound version.')
      scoring = self._in_service
    self._in_service = scoring
    # Loading a model takes its time anyway: the challenger too, rather than in the first batches.
    challenger = self._challenger_now(None, scoring.version, wait=True)
    return _ModelInService(_Serving(scoring, challenger, time.monotonic() + (self._check_interval() or 0)))

  def _check_interval(self) -> Optional[float]:
    intervals = [s for s in (self._poll_s, self._shadow_poll_s) if s is not None]
    return min(intervals) if intervals else None

  def _challenger_now(self, challenger: Optional[ScoringModel], in_service: str,
                      wait: bool) -> Optional[ScoringModel]:
    """The challenger to score in the shadow: the store's, once loaded; until then ``challenger``.

    None without shadowing, without a challenger in the store, or if it is refused.
    """
    if self._shadow_poll_s is None:
      return None
    version = self._store.challenger()
    if version is None:
      return None
    if challenger is not None and challenger.version == version:
      return challenger
    versions = self._versions()
    loaded = versions.get(version, in_service, self._alerts, wait)
    return loaded if loaded is not None or versions.refused(version) else challenger

  def _follow_store(self, model: _ModelInService) -> _Serving:
    """Takes a newly promoted champion (when polling) and the current challenger (when shadowing), once loaded.

    Returns:
      The snapshot to score with: the new one, or the one in service while
      another thread reads the store.
    """
    if not model.following.acquire(blocking=False):
      return model.serving
    try:
      serving = model.serving
      if time.monotonic() < serving.check_at:  # another thread has just read the store
        return serving
      scoring = serving.scoring
      version = self._store.current() if self._poll_s is not None else None
      if version is not None and version != scoring.version:
        loaded = self._versions().get(version, scoring.version, self._alerts, wait=False)
        if loaded is not None:
          _LOG.info('now scoring with model version %s (was %s)', version, scoring.version)
          scoring = self._in_service = loaded
      challenger = self._challenger_now(serving.challenger, scoring.version, wait=False)
      if challenger is not serving.challenger:
        _LOG.info('challenger in the shadow: %s', challenger.version if challenger else 'none')
      model.serving = _Serving(scoring, challenger, time.monotonic() + self._check_interval())
      return model.serving
    finally:
      model.following.release()

  def run_inference(self, batch: Sequence[Dict[str, Any]], model: _ModelInService,
                    inference_args: Optional[Dict[str, Any]] = None) -> Iterable[PredictionResult]:
    serving = model.serving
    if self._check_interval() is not None and time.monotonic() >= serving.check_at:
      serving = self._follow_store(model)
    scoring, challenger = serving.scoring, serving.challenger
    scores = _scores(scoring, batch)
    shadow_scores = _scores(challenger, batch) if challenger else [None] * len(batch)
    scored_at = time.time()
    return [PredictionResult(
        row, Score(score, bool(score >= scoring.threshold), scoring.threshold, scored_at,
                   None if shadow is None else ShadowScore(challenger.version, shadow, shadow >= challenger.threshold)),
        scoring.version)
            for row, score, shadow in zip(batch, scores, shadow_scores, strict=True)]

  def get_num_bytes(self, batch: Sequence[Dict[str, Any]]) -> int:
    features = len(self._in_service.feature_names) if self._in_service else 0
    return len(batch) * features * np.dtype(np.float32).itemsize

  def get_metrics_namespace(self) -> str:
    return 'kbml.scoring'

  def batch_elements_kwargs(self) -> Dict[str, int]:
    return dict(self._batching)


def _scores(scoring: ScoringModel, batch: Sequence[Dict[str, Any]]) -> List[float]:
  # The rows are padded to a power of two: TensorFlow's CPU kernels keep what they prepare for each input shape
  # they meet, so batches of every size from 1 to 1,000 grew the scorer by about 160 MB (BENCHMARKS.md, soak).
  rows = 1 << max(len(batch) - 1, 0).bit_length()
  features = np.zeros((rows, len(scoring.feature_names)), dtype=np.float32)
  features[:len(batch)] = [[row[name] for name in scoring.feature_names] for row in batch]
  scores = np.asarray(scoring.network.predict_on_batch(features), dtype=np.float64).reshape(-1)[:len(batch)]
  if not np.all(np.isfinite(scores)):
    raise ValueError(f'model version {scoring.version} gave non-finite scores')
  return scores.tolist()


class ServicePeriods(NonMergingWindowFn):
  """Windows each element into the period its time falls in, between one promotion and the next.

  With the promotion records as RunInference's side input in the same
  windows, each element is scored by the version that was in service at
  its time. Elements before the first promotion fall into a period of no
  model.

  Args:
    promoted_at: the promotion times, in seconds since the epoch.
  """

  def __init__(self, promoted_at: Sequence[float]):
    self._starts: List[float] = sorted(promoted_at)

  def assign(self, context) -> List[IntervalWindow]:
    index = bisect.bisect_right(self._starts, float(context.timestamp)) - 1
    start = Timestamp.of(self._starts[index]) if index >= 0 else MIN_TIMESTAMP
    end = Timestamp.of(self._starts[index + 1]) if index + 1 < len(self._starts) else MAX_TIMESTAMP
    return [IntervalWindow(start, end)]

  def get_window_coder(self):
    return IntervalWindowCoder()


def promotion_history(pipeline: Union[beam.Pipeline, beam.pvalue.PBegin],
                      store: ModelStore) -> Tuple[beam.PCollection, List[float]]:
  """The store's promotions as ModelMetadata side-input elements, windowed into their service periods.

  Returns:
    The side-input PCollection, and the promotion times (for the main
    input's :class:`ServicePeriods`).
  """
  promotions = store.promotions()
  times = [p.promoted_at for p in promotions]
  metadata = (pipeline
              | 'Promotions' >> beam.Create([(p.promoted_at, p.path, p.version) for p in promotions])
              | 'AtPromotionTime' >> beam.MapTuple(lambda at, path, version: beam.window.TimestampedValue(
                  ModelMetadata(model_id=path, model_name=version), at)).with_output_types(ModelMetadata)
              | 'PromotionsIntoServicePeriods' >> beam.WindowInto(ServicePeriods(times)))
  return metadata, times
