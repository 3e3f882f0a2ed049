"""The Flower runtime: memfl's strategies and trainers on Flower's deployment runtime (``flwr``).

A thin adapter, no second copy of any algorithm (see docs/FLOWER.md):

- :mod:`~memfl.runtime.flower.serde`      Instruction / Result <-> Flower records (tensors + JSON, no pickle)
- :mod:`~memfl.runtime.flower.appconfig`  the Flower app's pyproject.toml and the run config both apps read
- :mod:`~memfl.runtime.flower.server_app` ``app``: a ServerApp driving any memfl Strategy
- :mod:`~memfl.runtime.flower.client_app` ``app``: a ClientApp running memfl's LocalTrainer
- :mod:`~memfl.runtime.flower.local`      a SuperLink + N SuperNodes on 127.0.0.1 (``memfl flower local``)
- :mod:`~memfl.cli.flower`        ``memfl flower app`` / ``memfl flower local``

Nothing here is imported by ``import memfl``: flwr is loaded only when this runtime is used.
"""
