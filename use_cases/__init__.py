"""Use cases of the engine, one package each, each declaring a ``USE_CASE`` (:class:`transforms.use_case.UseCase`).

``fraud``: credit-card fraud after the Fraud Detection Handbook, the default.
``iot``: predictive maintenance of a machine fleet.
"""
