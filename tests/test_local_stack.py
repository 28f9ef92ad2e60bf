"""The local stack and the `kbml` command line, with real broker processes."""

import socket
import subprocess
import sys

import pytest

from kbml.local_stack import PROJECT_TOPICS, LocalStack, LocalStackError
from tests.conftest import produce


def _kbml(*args, env=None):
  return subprocess.run([sys.executable, '-m', 'kbml.cli', *args], capture_output=True, text=True, timeout=60,
                        env=env)


def test_up_twice_is_harmless_and_status_shows_offsets(tmp_path):
  stack = LocalStack(str(tmp_path))
  try:
    bootstrap = stack.up(port=0)
    pid = stack.status().pid
    assert stack.up(port=0) == bootstrap and stack.status().pid == pid
    produce(bootstrap, 'transactions', [(b'k', b'%d' % i, []) for i in range(1_000)])

    status = stack.status()
    assert status.reachable and set(PROJECT_TOPICS) <= set(status.topics)
    assert sum(p.high - p.low for p in status.topics['transactions']) == 1_000
    assert [len(status.topics[t]) for t in PROJECT_TOPICS] == [4] * 5
  finally:
    assert stack.down(grace_s=0)
  assert not stack.status().running and not stack.down()


def test_a_taken_port_is_a_clear_error(tmp_path):
  with socket.socket() as taken:
    taken.bind(('127.0.0.1', 0))
    taken.listen()
    with pytest.raises(LocalStackError, match=f'Port {taken.getsockname()[1]} on 127.0.0.1 is already in use'):
      LocalStack(str(tmp_path)).up(port=taken.getsockname()[1])


def test_a_missing_broker_binary_is_a_clear_error(tmp_path, monkeypatch):
  monkeypatch.setenv('KBML_BROKER_BINARY', str(tmp_path / 'tansu'))
  with pytest.raises(LocalStackError, match='is not an executable file'):
    LocalStack(str(tmp_path)).up(port=0)


def test_cli_up_status_down(tmp_path):
  state = ['--state-dir', str(tmp_path)]
  up = _kbml('local', 'up', '--port', '0', *state)
  try:
    assert up.returncode == 0 and 'local broker started at 127.0.0.1:' in up.stdout, up.stderr
    assert 'already running' in _kbml('local', 'up', '--port', '0', *state).stdout
    status = _kbml('local', 'status', *state)
    assert status.returncode == 0 and 'reachable' in status.stdout and 'dead-letter' in status.stdout
  finally:
    assert _kbml('local', 'down', *state).stdout.strip() == 'local broker stopped'
  assert 'not running' in _kbml('local', 'status', *state).stdout


def test_cli_errors_are_one_clear_line(tmp_path):
  with socket.socket() as taken:
    taken.bind(('127.0.0.1', 0))
    taken.listen()
    result = _kbml('local', 'up', '--port', str(taken.getsockname()[1]), '--state-dir', str(tmp_path))
  assert result.returncode == 2 and result.stderr.startswith('kbml: error: Port ')
  assert 'Traceback' not in result.stderr


@pytest.mark.parametrize('command', [['--help'], ['local', '--help'], ['local', 'up', '--help'],
                                     ['local', 'status', '--help'], ['mirror', '--help'], ['ingest', '--help'],
                                     ['simulate', '--help'], ['warehouse', 'summary', '--help']])
def test_every_command_has_help(command):
  result = _kbml(*command)
  assert result.returncode == 0 and 'usage:' in result.stdout.lower(), result.stderr
