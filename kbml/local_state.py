"""The local state folder and the default paths in it.

Imports nothing of the project, so code that only needs a default path (a
pipeline's options, the warehouse, the model store) does not load the broker
process manager or the command line with it.
"""

import os

DEFAULT_STATE_DIR = '.kbml'


def local_state_dir() -> str:
  """The local stack's state folder: $KBML_STATE_DIR, else .kbml."""
  return os.environ.get('KBML_STATE_DIR', DEFAULT_STATE_DIR)


def default_model_dir() -> str:
  """The local model store: models/ in the state folder."""
  return os.path.join(local_state_dir(), 'models')
