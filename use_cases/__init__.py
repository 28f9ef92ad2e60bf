"""Use cases of the engine, one package each.

``iot``: predictive maintenance of a machine fleet (so far its simulator). The
fraud case still lives in the engine (``kbml/simulator.py``,
``transforms/records.py``, ``transforms/features.py``) until a use-case API
lets the engine take either.
"""
