"""The imports point one way: the command line and the demo on top, then the pipelines, then the transforms and the
trainer, then the I/O helpers. Read from the sources (every import, those inside functions included)."""

import ast
import os
from typing import Dict, List, Set, Tuple

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ('kbml', 'pipelines', 'transforms', 'trainer', 'use_cases')
BELOW_THE_COMMAND_LINE = ('pipelines', 'transforms', 'trainer', 'use_cases')
COMMAND_LINE_AND_DEMO = ('kbml.cli', 'kbml.loop')
ENGINE = ('kbml', 'pipelines', 'transforms', 'trainer')


def _modules() -> Dict[str, str]:
  """Every module of the packages, by dotted name, with its file."""
  modules = {}
  for package in PACKAGES:
    for folder, _, files in os.walk(os.path.join(PROJECT_ROOT, package)):
      for name in files:
        if name.endswith('.py'):
          path = os.path.join(folder, name)
          dotted = os.path.relpath(path, PROJECT_ROOT)[:-len('.py')].replace(os.sep, '.')
          modules[dotted.removesuffix('.__init__')] = path
  return modules


def _imports(modules: Dict[str, str]) -> Tuple[Dict[str, Set[str]], List[str]]:
  """Each module's imports of the project's modules, and the private names imported from another module."""
  graph, private = {}, []
  for module, path in modules.items():
    with open(path, encoding='utf-8') as f:
      tree = ast.parse(f.read(), path)
    imported = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        imported |= {alias.name for alias in node.names if alias.name.split('.')[0] in PACKAGES}
      elif isinstance(node, ast.ImportFrom) and node.module and node.module.split('.')[0] in PACKAGES:
        for alias in node.names:
          if f'{node.module}.{alias.name}' in modules:
            imported.add(f'{node.module}.{alias.name}')
          else:
            imported.add(node.module)
            if alias.name.startswith('_') and not (alias.name.startswith('__') and alias.name.endswith('__')):
              private.append(f'{module} imports {alias.name} from {node.module}')
    graph[module] = imported - {module}
  return graph, private


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
  """The import cycles: strongly connected groups of more than one module (Tarjan)."""
  index, low, stack, on_stack, groups = {}, {}, [], set(), []

  def visit(module: str):
    index[module] = low[module] = len(index)
    stack.append(module)
    on_stack.add(module)
    for imported in graph.get(module, ()):
      if imported not in index:
        visit(imported)
        low[module] = min(low[module], low[imported])
      elif imported in on_stack:
        low[module] = min(low[module], index[imported])
    if low[module] == index[module]:
      group = []
      while True:
        member = stack.pop()
        on_stack.discard(member)
        group.append(member)
        if member == module:
          break
      if len(group) > 1:
        groups.append(sorted(group))

  for module in sorted(graph):
    if module not in index:
      visit(module)
  return groups


def test_nothing_below_the_command_line_imports_it_or_the_demo():
  graph, _ = _imports(_modules())
  upward = [f'{module} imports {imported}' for module, imports in sorted(graph.items())
            if module.startswith(BELOW_THE_COMMAND_LINE) for imported in sorted(imports)
            if imported.startswith(COMMAND_LINE_AND_DEMO)]
  assert not upward


def test_the_engine_imports_no_use_case():
  """The engine takes a use case by name (``--use-case``): it imports none, fraud included."""
  graph, _ = _imports(_modules())
  imports_a_use_case = [f'{module} imports {imported}' for module, imports in sorted(graph.items())
                        if module.startswith(ENGINE) for imported in sorted(imports)
                        if imported.startswith('use_cases')]
  assert not imports_a_use_case


def test_no_private_name_is_imported_from_another_module():
  _, private = _imports(_modules())
  assert not private


def test_the_imports_have_no_cycle():
  graph, _ = _imports(_modules())
  assert not _cycles(graph)


def test_the_walk_sees_imports_inside_functions_and_a_cycle():
  graph, _ = _imports(_modules())
  assert 'kbml.local_state' in graph['pipelines.options']  # imported inside a method
  assert _cycles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == [['a', 'b', 'c']]


def test_a_worker_that_parses_scores_and_writes_loads_no_broker_manager_or_command_line():
  graph, _ = _imports(_modules())
  loaded, waiting = set(), ['transforms.records', 'use_cases.fraud.features', 'use_cases.iot.features',
                            'transforms.inference', 'transforms.warehouse_io', 'transforms.monitoring']
  while waiting:
    module = waiting.pop()
    if module not in loaded:
      loaded.add(module)
      waiting.extend(graph.get(module, ()))
  assert not loaded & {'kbml.local_stack', *COMMAND_LINE_AND_DEMO, 'trainer.task'}
