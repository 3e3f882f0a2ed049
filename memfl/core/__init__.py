"""What every method and runtime shares: the plain data between server and clients
(:mod:`~memfl.core.protocol`), the engine registry (:mod:`~memfl.core.engine`), optimizers
(:mod:`~memfl.core.optim`), the client's :class:`~memfl.core.trainer.LocalTrainer`, FedAvg
aggregation (:mod:`~memfl.core.aggregate`), the :class:`~memfl.core.strategy.Strategy` base,
seeding and the method registry. Nothing here imports a method.
"""
