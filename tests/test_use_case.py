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
