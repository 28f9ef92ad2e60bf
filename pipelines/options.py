"""Pipeline options shared by every pipeline, and what each runner gets.

The pipelines choose their forms from what the runner can do, not from its
name (:func:`runs_in_process`, :func:`runs_remotely`):

- The FnApiRunner runs the whole pipeline in this process, stage after
  stage. A stage fused with the Kafka read gets no watermark from it, and a
  side input never updates while an unbounded job runs: the pipelines read
  the partitions in event-time step and keep the feature histories in the
  process (``ORDERED_BUNDLES``), and the scorer polls the model store.
- Beam's ``DirectRunner`` first tries Prism, a Go binary it downloads from
  the internet, and falls back to the FnApiRunner when that fails. A user
  with internet access would silently get a different runner from one
  without, so it is pinned to the FnApiRunner, which is also the default.
- Every other runner (Prism, Flink, Dataflow, ...) carries watermarks
  between stages: keyed state with event-time timers (``KEYED_STATE``).
  Those that update a side input while an unbounded job runs (not Prism)
  take the model from a ``WatchFilePattern`` side input; the others poll.
- The Dataflow runner's workers are other machines: the local broker,
  warehouse and model store are refused there (:func:`refuse_local_settings`).

The FnApiRunner of Beam 2.77 grows without bound in a long unbounded run
(see :func:`keep_fn_api_runner_metrics_flat`); the pipelines here mend that
before they run on it.
"""

import argparse
import re
import sys
from typing import Dict, List, Optional, Sequence, Type

from apache_beam.metrics import monitoring_infos
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions, TestOptions
from apache_beam.runners.dataflow.dataflow_runner import DataflowRunner
from apache_beam.runners.direct.direct_runner import SwitchingDirectRunner
from apache_beam.runners.portability.fn_api_runner import fn_runner
from apache_beam.runners.portability.prism_runner import PrismRunner
from apache_beam.runners.runner import PipelineRunner, create_runner

from kbml.kafka_config import kafka_client_config
from kbml.local_stack import local_bootstrap_servers
from transforms.kafka_io import KAFKA_IO_JAVA, KAFKA_IO_PYTHON

LOCAL_RUNNER = 'FnApiRunner'
# Beam parses every PipelineOptions class together, so an option two pipelines share is declared once, here.


class KafkaOptions(PipelineOptions):
  """How to talk to Kafka.

  ``--bootstrap_servers`` is Beam's own option (declared by its Kafka Streams
  runner options), read here too: when it is not given, the pipelines use the
  local broker started by ``kbml local up``.
  """

  @classmethod
  def _add_argparse_args(cls, parser):
    parser.add_argument(
        '--kafka_config', action='append', default=[], metavar='KEY=VALUE',
        help='A Kafka client setting passed through unchanged (librdkafka names: security.protocol, '
        'sasl.mechanism, sasl.username, ...). Repeatable. ${VAR} in a value is read from the environment.')
    parser.add_argument('--kafka_config_file', help='A .properties file of Kafka client settings.')
    parser.add_argument(
        '--kafka_io', choices=(KAFKA_IO_PYTHON, KAFKA_IO_JAVA), default=KAFKA_IO_PYTHON,
        help='python: the bundled Python-native Kafka IO (every runner). java: Beam\'s cross-language '
        'KafkaIO, which needs a Java expansion service (Beam fetches its jar from Maven, or see '
        '--kafka-expansion-service).')
    parser.add_argument('--kafka_expansion_service', help='host:port of a running Kafka expansion service.')
    parser.add_argument(
        '--consumer_group',
        help='Consumer group: the read resumes after its committed offsets, and commits after each bundle.')
    parser.add_argument('--stop_at_end', action='store_true',
                        help='Bounded: read what the topics hold when the job starts, then stop.')
    parser.add_argument('--idle_timeout_s', type=float, help='Bounded: stop a partition after this many idle seconds.')


class WarehouseOptions(PipelineOptions):
  """The warehouse a pipeline writes (ingest: training rows; monitoring: metrics)."""

  @classmethod
  def _add_argparse_args(cls, parser):
    parser.add_argument('--warehouse', help='duckdb:///path/file.duckdb (default: .kbml/warehouse.duckdb) or '
                        'bigquery://PROJECT/DATASET.')

  def warehouse_url(self) -> str:
    from kbml.warehouse import default_warehouse_url
    return self.warehouse or default_warehouse_url()


class ModelOptions(PipelineOptions):
  """The model store, the predictions and the alerts (scoring writes them, monitoring reads them)."""

  @classmethod
  def _add_argparse_args(cls, parser):
    parser.add_argument('--predictions_topic', default='predictions')
    parser.add_argument('--alerts_topic', default='alerts', help='Where refused models and monitoring alerts go.')
    parser.add_argument('--model_dir', help='The model store, a folder or gs:// prefix (default: .kbml/models).')

  def model_dir_or_default(self) -> str:
    from kbml.local_state import default_model_dir
    return self.model_dir or default_model_dir()


def _consolidated_monitoring_infos(infos) -> List:
  return list(monitoring_infos.consolidate(infos))


def keep_fn_api_runner_metrics_flat():
  """Makes the FnApiRunner keep its metrics as lists, so that its memory stays flat in an unbounded run.

  After each bundle, ``FnApiRunner.run_stages`` replaces each stage's metrics
  with ``consolidate_monitoring_infos(chain(bundle metrics, previous))``:
  a generator, which nothing consumes until the pipeline ends. Every bundle
  so adds one generator that holds the one before it and its bundle's whole
  ProcessBundleResponse (a protobuf arena, outside Python's allocator): about
  6 KB per bundle and stage, which an unbounded read that defers every few
  milliseconds turns into megabytes a second. Consuming the consolidation at
  once keeps one merged list per stage. Safe to call more than once.
  """
  fn_runner.consolidate_monitoring_infos = _consolidated_monitoring_infos


def _runner(options: PipelineOptions) -> PipelineRunner:
  runner = options.view_as(StandardOptions).runner or LOCAL_RUNNER
  return runner if isinstance(runner, PipelineRunner) else create_runner(runner)


def runs_in_process(options: PipelineOptions) -> bool:
  """Whether the runner runs the whole pipeline in this process, stage after stage (the FnApiRunner): no
  watermark reaches the stages fused with an unbounded read, and side inputs do not update while it runs."""
  return isinstance(_runner(options), fn_runner.FnApiRunner)


def updates_side_inputs(options: PipelineOptions) -> bool:
  """Whether a side input of an unbounded run in the global window gets its new values while the job runs
  (``WatchFilePattern``): not on the FnApiRunner, nor on Prism (apache/beam#31438, which refuses the job)."""
  return not isinstance(_runner(options), (fn_runner.FnApiRunner, PrismRunner))


def runs_remotely(options: PipelineOptions) -> bool:
  """Whether the runner's workers are other machines (Dataflow): they cannot reach this machine's broker, files
  or warehouse."""
  return isinstance(_runner(options), DataflowRunner)


def will_run(options: PipelineOptions) -> bool:
  """Whether the job will run, rather than only be built (``--dry-run``): what a pipeline looks up before it
  builds its graph (group offsets, the model in service, the warehouse's tables) is looked up only then."""
  return not options.view_as(TestOptions).dry_run


def refuse_local_settings(options: PipelineOptions, documented: Sequence[Type[PipelineOptions]]):
  """Raises ValueError when a remote runner is given a setting only this machine can serve.

  Args:
    options: the parsed options.
    documented: the options classes the pipeline reads (a warehouse and a model store only matter to those
      that read WarehouseOptions or ModelOptions).
  """
  if not runs_remotely(options):
    return
  runner = options.view_as(StandardOptions).runner
  refused = []
  if not options.get_all_options(drop_default=True).get('bootstrap_servers'):
    refused.append('the local broker (`kbml local up`): pass --bootstrap-servers HOST:PORT of a broker the workers '
                   'reach')
  if WarehouseOptions in documented and not options.view_as(WarehouseOptions).warehouse_url().startswith(
      'bigquery://'):
    refused.append(f'the warehouse {options.view_as(WarehouseOptions).warehouse_url()}: pass --warehouse '
                   'bigquery://PROJECT/DATASET')
  if ModelOptions in documented and not options.view_as(ModelOptions).model_dir_or_default().startswith('gs://'):
    refused.append(f'the model store {options.view_as(ModelOptions).model_dir_or_default()}: pass --model-dir '
                   'gs://BUCKET/PREFIX')
  if refused:
    raise ValueError(f'{runner} workers cannot reach what is on this machine: ' + '; '.join(refused) + '.')


def kafka_config(options: PipelineOptions) -> Dict[str, str]:
  """The Kafka client settings these options describe."""
  kafka = options.view_as(KafkaOptions)
  bootstrap = options.get_all_options(drop_default=True).get('bootstrap_servers') or local_bootstrap_servers()
  return kafka_client_config(bootstrap, kafka.kafka_config, kafka.kafka_config_file)


def finished_counters(result, namespace: str) -> Dict[str, int]:
  """The Beam counters of a finished run in ``namespace``, by name (committed values where the runner has them)."""
  return {counter.key.metric.name: counter.committed or counter.attempted or 0
          for counter in result.metrics().query(MetricsFilter().with_namespace(namespace))['counters']}


_FLAG = re.compile(r'--[a-z0-9]+(?:_[a-z0-9]+)+')


def dashes_to_underscores(arg: str) -> str:
  """A flag in the command line's style (``--model-dir``, as every ``kbml`` command spells it) in Beam's
  (``--model_dir``), which the pipelines also take; anything but a flag is left as it is."""
  if not arg.startswith('--'):
    return arg
  name, equals, value = arg.partition('=')
  return '--' + name[2:].replace('-', '_') + equals + value


def pipeline_options(argv: Optional[List[str]], documented: Sequence[Type[PipelineOptions]] = (),
                     prog: Optional[str] = None) -> PipelineOptions:
  """Parses pipeline options, pinning the local runner unless one is given.

  Args:
    argv: the command line; None reads ``sys.argv``.
    documented: the options classes whose flags ``--help`` prints (beside
      the runner and Kafka options; Beam's others are listed in its docs).
    prog: the program name ``--help`` shows.

  Raises:
    ValueError: a remote runner is given a setting only this machine can serve (:func:`refuse_local_settings`).
  """
  argv = [dashes_to_underscores(arg) for arg in (sys.argv[1:] if argv is None else argv)]
  if '--help' in argv or '-h' in argv:
    parser = argparse.ArgumentParser(prog=prog, description=(sys.modules['__main__'].__doc__ or '').strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--runner', default=LOCAL_RUNNER, help='Beam runner: FnApiRunner (local, the default; '
                        'DirectRunner runs on it too), PrismRunner, FlinkRunner, DataflowRunner, ...')
    parser.add_argument('--bootstrap_servers', help='Kafka bootstrap servers, host:port[,host:port] (default: the '
                        'local broker of `kbml local up`).')
    for options_class in (*documented, KafkaOptions):
      options_class._add_argparse_args(parser.add_argument_group(options_class.__name__))
    print(_FLAG.sub(lambda flag: flag.group(0).replace('_', '-'), parser.format_help()), end='')
    sys.exit(0)
  options = PipelineOptions(argv)
  standard = options.view_as(StandardOptions)
  if not standard.runner or isinstance(_runner(options), SwitchingDirectRunner):
    standard.runner = LOCAL_RUNNER
  if runs_in_process(options):
    keep_fn_api_runner_metrics_flat()
  refuse_local_settings(options, documented)
  return options
