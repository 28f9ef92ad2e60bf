"""Elements that carry lists of elements, for the stages of a local runner's streaming pipelines.

On the local runner (FnApiRunner) Beam's work per element and step is most
of what it adds to a pipeline's own CPU time. The stages fused behind a
batched read pass :class:`Batch` elements instead: runs of Kafka records
(``ReadFromKafka(batched=True)``), the events parsed from them
(``ParseRecords``), and feature rows (``ComputeFeatures(rows_per_batch=N)``), which
RunInference takes as batches of its own.
"""

import pickle
from typing import Iterable, Sequence, Sized

import apache_beam as beam
from apache_beam.coders import coder_impl
from apache_beam.coders.coders import PickleCoder

# Beam estimates the size of sampled elements with their coder, from the first outputs of every call of a
# splittable DoFn on: measuring a sample of a batch's items is enough, and pickling whole batches took 5% of a
# scorer's CPU.
_SIZE_SAMPLE = 8


class Batch(list):
  """A list of elements handed on as one element."""


def items_of(element) -> Sequence:
  """The items of a Batch, or the element itself as the only one: for steps that take either."""
  return element if isinstance(element, Batch) else (element,)


def in_kind_of(element, outputs: Batch) -> Iterable:
  """A step's outputs for ``element`` in the kind it came in: one Batch (if not empty) for a Batch, else one by
  one."""
  if not isinstance(element, Batch):
    return outputs
  return [outputs] if outputs else []


def _estimated_size(batch: Sized) -> int:
  sample = batch[::max(1, len(batch) // _SIZE_SAMPLE)]
  if not sample:
    return len(pickle.dumps(batch, pickle.HIGHEST_PROTOCOL))
  return len(batch) * sum(len(pickle.dumps(item, pickle.HIGHEST_PROTOCOL)) for item in sample) // len(sample)


class BatchCoder(PickleCoder):
  """Pickles a :class:`Batch`; estimates its size from a sample of its items."""

  def _create_impl(self):
    return coder_impl.CallbackCoderImpl(lambda batch: pickle.dumps(batch, pickle.HIGHEST_PROTOCOL), pickle.loads,
                                        _estimated_size)

  def to_type_hint(self):
    return Batch


beam.coders.registry.register_coder(Batch, BatchCoder)
