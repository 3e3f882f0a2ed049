"""Runtimes that drive strategies and trainers. There are two, over one algorithm:

- ``sim`` (the default): the in-process simulator -- every client trains in this process, one after
  the other, on a virtual clock (``memfl run``).
- ``flower``: Flower's deployment runtime (``flwr==1.41.0``), for real devices and many hosts -- a
  thin adapter whose ``ServerApp`` calls the same :class:`~memfl.core.strategy.Strategy` and whose
  ``ClientApp`` calls the same :class:`~memfl.core.trainer.LocalTrainer`, exchanging
  ``Instruction``/``Result`` as Flower records (``memfl flower app``, ``memfl flower local``;
  docs/FLOWER.md).

Neither runtime holds an algorithm of its own: selection, planning and aggregation are the
strategy's, training is the trainer's.
"""
