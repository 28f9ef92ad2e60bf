"""The model store: versioned models with their metadata, and the pointer to the one in service.

A store is a folder, local or on Cloud Storage (``gs://bucket/prefix``),
reached through Beam's ``FileSystems`` like the pipelines' files::

    ROOT/versions/VERSION/model.keras        the Keras 3 model, normalisation inside
    ROOT/versions/VERSION/metadata.json      version, training range, features and their
                                             statistics, metrics, threshold, parent, blessing
    ROOT/versions/VERSION/*.png              the evaluation plots
    ROOT/current                             {"version": ..., "promoted_at": ...}: the champion
    ROOT/challenger                          {"version": ..., "since": ...}: a version scored in the
                                             shadow of the champion (optional)
    ROOT/promotions/TIME-VERSION.json        one record per promotion, never changed: the
                                             history a backtest replays, and the files a
                                             scorer's WatchFilePattern side input watches

Publishing is atomic: a version's files are written first and its
``metadata.json`` last, under a temporary name renamed into place (a rename
on a local disk, one object creation on Cloud Storage). A version without
metadata is not a version, so a half-written model is never visible, and
the metadata records the model file's size and SHA-256, so a truncated or
corrupt file is refused when loaded. ``current`` is replaced the same way.

Promotions and changes of the challenger are serialised across processes (a
manual ``kbml promote`` and a retrain's may come at once): a promotion's
record and pointer are written together, records in the order of the
pointer's moves, and a gated promotion (:meth:`ModelStore.promote_replacing`)
checks the version in service and replaces it in one step. On a local disk
they hold an exclusive ``flock`` of ``ROOT/.promotion.lock`` (released when
the holder ends, even if it crashed).

On Cloud Storage (and any other file system but the local one) there is no
such lock: each object write is still atomic and each record has its own
name, so no record is lost and a reader sees a whole pointer, but two
promotions at once may leave the pointer on the one recorded first, and a
gated promotion checks the pointer and then writes it, a window of one
object read and write. Closing them takes a compare-and-swap of the pointer
(a write with ``ifGenerationMatch`` set to the generation read), which
Beam's ``FileSystems`` does not offer; until then, promote into a Cloud
Storage store from one place at a time (the retrain job, or a person).
"""

import contextlib
import datetime
import fcntl
import hashlib
import json
import os
import secrets
from typing import Any, Dict, Iterator, List, NamedTuple, Optional

from apache_beam.io.filesystem import BeamIOError
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.localfilesystem import LocalFileSystem

from transforms.use_case import DEFAULT_USE_CASE

MODEL_FILE = 'model.keras'
METADATA_FILE = 'metadata.json'
CURRENT_FILE = 'current'
CHALLENGER_FILE = 'challenger'
PROMOTIONS_DIR = 'promotions'
PROMOTION_LOCK_FILE = '.promotion.lock'


class ModelStoreError(ValueError):
  """A model version is missing, incomplete or corrupt: not something to load or serve."""


class Promotion(NamedTuple):
  """A version put in service at a time (seconds since the epoch), recorded in a file."""
  promoted_at: float
  version: str
  path: str


def new_version(now: Optional[datetime.datetime] = None) -> str:
  """A version name that sorts by creation time: ``20261121-101502-3fa2c1``."""
  now = now or datetime.datetime.now(datetime.timezone.utc)
  return f'{now:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}'


def _read(path: str) -> bytes:
  with FileSystems.open(path) as f:
    return f.read()


def _write_atomically(path: str, data: bytes):
  staging = f'{path}.tmp-{secrets.token_hex(4)}'
  with FileSystems.create(staging) as f:
    f.write(data)
  # A rename replaces the file in one step (a local rename, a Cloud Storage copy): readers see the old or the new.
  FileSystems.rename([staging], [path])


def _sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


class ModelStore:
  """A folder of model versions (see the module docstring).

  Args:
    root: a local folder or a ``gs://`` prefix; created on first write.
  """

  def __init__(self, root: str):
    self.root = root.rstrip('/')

  def version_dir(self, version: str) -> str:
    return FileSystems.join(self.root, 'versions', version)

  def model_path(self, version: str) -> str:
    return FileSystems.join(self.version_dir(version), MODEL_FILE)

  def publish(self, version: str, model_file: str, metadata: Dict[str, Any], extra_files: Dict[str, str]) -> str:
    """Copies a saved model and its plots into the store, then commits the metadata.

    Args:
      version: the new version's name (:func:`new_version`).
      model_file: the local ``.keras`` file to publish.
      metadata: what to record; the model file's size and checksum are added.
      extra_files: name in the version folder -> local file (plots).

    Returns:
      The version folder.
    """
    folder = self.version_dir(version)
    if FileSystems.exists(FileSystems.join(folder, METADATA_FILE)):
      raise ModelStoreError(f'Version {version} already exists in {self.root}.')
    with open(model_file, 'rb') as f:
      model_bytes = f.read()
    for name, path in {MODEL_FILE: model_file, **extra_files}.items():
      with open(path, 'rb') as source, FileSystems.create(FileSystems.join(folder, name)) as f:
        f.write(source.read())
    metadata = {**metadata, 'version': version, 'model_file': MODEL_FILE, 'model_bytes': len(model_bytes),
                'model_sha256': _sha256(model_bytes), 'files': sorted(extra_files)}
    _write_atomically(FileSystems.join(folder, METADATA_FILE), json.dumps(metadata, indent=2).encode())
    return folder

  def versions(self) -> List[str]:
    """The published versions (those with metadata), oldest first."""
    try:
      matches = FileSystems.match([FileSystems.join(self.root, 'versions', '*', METADATA_FILE)])[0].metadata_list
    except BeamIOError:
      return []
    return sorted(m.path.rstrip('/').split('/')[-2] for m in matches)

  def metadata(self, version: str) -> Dict[str, Any]:
    """A version's metadata; ModelStoreError if the version is not (completely) published."""
    path = FileSystems.join(self.version_dir(version), METADATA_FILE)
    try:
      return json.loads(_read(path))
    except (BeamIOError, OSError) as e:
      raise ModelStoreError(f'{self.version_dir(version)} has no {METADATA_FILE}: it is not a published model '
                            f'version (a publication that did not finish, or a wrong path).') from e
    except json.JSONDecodeError as e:
      raise ModelStoreError(f'{path} is not valid JSON: {e}') from e

  def use_case_in_service(self) -> str:
    """The name of the use case the version in service was trained for (``fraud`` without one, or for a version
    published before the use-case API)."""
    current = self.current()
    return self.metadata(current).get('use_case', DEFAULT_USE_CASE) if current else DEFAULT_USE_CASE

  def update_metadata(self, version: str, **changes):
    """Records more about a published version (the blessing decision)."""
    metadata = {**self.metadata(version), **changes}
    _write_atomically(FileSystems.join(self.version_dir(version), METADATA_FILE),
                      json.dumps(metadata, indent=2).encode())

  def verified_model_bytes(self, version: str) -> bytes:
    """The model file's bytes, checked against the size and checksum in the metadata."""
    metadata = self.metadata(version)
    path = self.model_path(version)
    try:
      data = _read(path)
    except (BeamIOError, OSError) as e:
      raise ModelStoreError(f'Model version {version} has no model file {path}.') from e
    if len(data) != metadata['model_bytes'] or _sha256(data) != metadata['model_sha256']:
      raise ModelStoreError(
          f'The model file {path} is truncated or corrupt: {len(data):,} bytes with SHA-256 {_sha256(data)[:12]}..., '
          f'the metadata says {metadata["model_bytes"]:,} bytes, {metadata["model_sha256"][:12]}... '
          'Publish the version again; do not serve this one.')
    return data

  def load_model(self, version: str):
    """Loads a version's Keras model after checking its file (ModelStoreError if it is damaged)."""
    import tempfile

    import keras

    from trainer.trees import TreeEnsemble
    data = self.verified_model_bytes(version)
    with tempfile.NamedTemporaryFile(suffix='.keras') as f:
      f.write(data)
      f.flush()
      try:
        return keras.models.load_model(f.name, custom_objects={'kbml>TreeEnsemble': TreeEnsemble})
      except Exception as e:  # noqa: BLE001 - Keras raises many kinds; all mean the same to a caller
        raise ModelStoreError(f'Model version {version} cannot be loaded: {e}') from e

  def current(self) -> Optional[str]:
    """The version in service, or None before the first promotion."""
    return self._pointer(CURRENT_FILE)

  def challenger(self) -> Optional[str]:
    """The version scored in the champion's shadow, or None."""
    return self._pointer(CHALLENGER_FILE)

  def _pointer(self, name: str) -> Optional[str]:
    try:
      return json.loads(_read(FileSystems.join(self.root, name)))['version']
    except (BeamIOError, OSError):
      return None

  def set_challenger(self, version: Optional[str]):
    """Puts a published version in the champion's shadow (its scores are recorded, not acted on); None: none."""
    if version is not None:
      self.metadata(version)
    with self._promotion_lock():
      self._write_challenger(version)

  def _write_challenger(self, version: Optional[str]):
    path = FileSystems.join(self.root, CHALLENGER_FILE)
    if version is None:
      if FileSystems.exists(path):
        FileSystems.delete([path])
      return
    since = datetime.datetime.now(datetime.timezone.utc).isoformat()
    _write_atomically(path, json.dumps({'version': version, 'since': since}).encode())

  def promote(self, version: str) -> Promotion:
    """Makes a published version the one in service: records the promotion, then moves the pointer."""
    self.metadata(version)
    with self._promotion_lock():
      return self._record_and_point(version)

  def promote_replacing(self, version: str, in_service: Optional[str]) -> Optional[Promotion]:
    """Promotes ``version`` only if ``in_service`` is still the version in service (None: none yet).

    The check and the promotion are one step for other promoters: a version
    gated against a champion never replaces another version promoted since.

    Returns:
      The promotion, or None when another version is in service now.
    """
    self.metadata(version)
    with self._promotion_lock():
      if self.current() != in_service:
        return None
      return self._record_and_point(version)

  def _record_and_point(self, version: str) -> Promotion:
    """Records a promotion and moves the pointer to it; the caller holds the promotion lock."""
    now = datetime.datetime.now(datetime.timezone.utc)
    latest = self._promoted_at(CURRENT_FILE)
    if latest is not None and now <= latest:
      # The history's order must be the pointer's, even if the clock stepped back or two came in one microsecond.
      now = latest + datetime.timedelta(microseconds=1)
    record = json.dumps({'version': version, 'promoted_at': now.isoformat()}).encode()
    path = FileSystems.join(self.promotions_dir(), f'{now:%Y%m%dT%H%M%S%fZ}-{version}.json')
    _write_atomically(path, record)
    _write_atomically(FileSystems.join(self.root, CURRENT_FILE), record)
    if self.challenger() == version:
      self._write_challenger(None)
    return Promotion(now.timestamp(), version, path)

  def _promoted_at(self, pointer: str) -> Optional[datetime.datetime]:
    """When the version a pointer holds was promoted, or None without a readable pointer."""
    try:
      return datetime.datetime.fromisoformat(json.loads(_read(FileSystems.join(self.root, pointer)))['promoted_at'])
    except (BeamIOError, OSError, ValueError, KeyError):
      return None

  @contextlib.contextmanager
  def _promotion_lock(self) -> Iterator[None]:
    """Holds the store's promotion lock (see the module docstring); on Cloud Storage, nothing."""
    if not isinstance(FileSystems.get_filesystem(self.root), LocalFileSystem):
      yield
      return
    os.makedirs(self.root, exist_ok=True)
    with open(os.path.join(self.root, PROMOTION_LOCK_FILE), 'a') as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)  # each open file is its own holder: threads of one process wait too
      yield  # closing the file releases it

  def promotions_dir(self) -> str:
    return FileSystems.join(self.root, PROMOTIONS_DIR)

  def promotion_pattern(self) -> str:
    """The glob of the promotion records: a new match is a new model in service."""
    return FileSystems.join(self.promotions_dir(), '*.json')

  def promotion(self, path: str) -> Promotion:
    """Reads one promotion record."""
    try:
      record = json.loads(_read(path))
      promoted_at = datetime.datetime.fromisoformat(record['promoted_at']).timestamp()
      return Promotion(promoted_at, record['version'], path)
    except (BeamIOError, OSError, ValueError, KeyError) as e:
      raise ModelStoreError(f'{path} is not a readable promotion record: {e}') from e

  def promotions(self) -> List[Promotion]:
    """Every promotion so far, oldest first."""
    try:
      matches = FileSystems.match([self.promotion_pattern()])[0].metadata_list
    except BeamIOError:
      return []
    return sorted(self.promotion(m.path) for m in matches)
