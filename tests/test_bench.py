"""The benchmarks still load: a move in the package breaks them before anyone runs `make bench`."""

import importlib
import os

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'bench')


@pytest.mark.parametrize('name', sorted(name[:-len('.py')] for name in os.listdir(BENCH)
                                        if name.endswith('.py') and name != '__init__.py'))
def test_a_benchmark_module_imports(name):
  assert importlib.import_module(f'bench.{name}').__name__ == f'bench.{name}'
