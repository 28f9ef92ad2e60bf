"""A use case is found by name: the built-in ones, a module of one's own, and clear errors for the rest."""

import pytest

from transforms.use_case import load_use_case


def test_built_in_use_cases_load_by_name_or_module():
  assert load_use_case('fraud').name == 'fraud' and load_use_case().name == 'fraud'
  assert load_use_case('iot') is load_use_case('use_cases.iot')
  assert load_use_case('iot').events_topic == 'readings'


@pytest.mark.parametrize('name, error', [
    ('retail', 'Unknown use case .retail.: no module use_cases.retail'),
    ('nowhere.to_be.found', 'Unknown use case .nowhere.to_be.found.: no module nowhere.to_be.found'),
    ('transforms.records', 'The module transforms.records declares no USE_CASE'),
])
def test_an_unknown_use_case_or_a_module_without_one_is_refused_with_what_to_do(name, error):
  with pytest.raises(ValueError, match=error):
    load_use_case(name)


@pytest.mark.parametrize('name', ['fraud', 'iot'])
def test_a_built_in_use_case_brings_all_its_parts_from_its_own_package(name):
  """The engine knows no use case: the schemas' rows, the features, the tables' rows and the simulator of each are
  defined under ``use_cases/<name>/``, not in an engine module that the use case merely names."""
  use_case = load_use_case(name)
  parts = {'event rows': use_case.event_schema.row_type, 'label rows': use_case.label_schema.row_type,
           'features': use_case.compute_features, 'label_row': use_case.label_row,
           'event_record': use_case.event_record, 'event_of_feature_row': use_case.event_of_feature_row,
           'snapshot_identity': use_case.snapshot_identity, 'history_span_days': use_case.history_span_days}
  elsewhere = {part: value.__module__ for part, value in parts.items()
               if not value.__module__.startswith(f'use_cases.{name}.')}
  assert not elsewhere
  assert use_case.simulator.startswith(f'use_cases.{name}.')
