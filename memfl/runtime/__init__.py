"""Runtimes that drive strategies and trainers. There are two, over one algorithm:

- ``sim`` (the default): the in-process simulator -- every client trains in this process, one after
  the other, on a virtual clock (``memfl run``).
- ``flower``: Flower's deployment runtime (``flwr==1.41.0``), for real devices and many hosts -- a
  thin adapter whose ``ServerApp`` calls the same :class:`~memfl.core.strategy.Strategy` and whose
  ``ClientApp`` calls the same :class:`~memfl.core.trainer.LocalTrainer`, exchanging
  ``Instruction``/``Result`` as Flower records (``memfl flower app``, ``memfl flower local``;
  docs/FLOWER.md).

Both drive the one round loop (:func:`memfl.server.loop.run_rounds`); a runtime is only an
executor (:class:`memfl.server.executor.Executor`): how instructions reach clients and results come
back (``sim.InProcessExecutor``, ``flower.server_app.FlowerExecutor``). Neither holds an algorithm or
a record format of its own: selection, planning and aggregation are the strategy's, training is the
trainer's, the records and checkpoints the loop's, so every round-record field means the same on both.
"""
