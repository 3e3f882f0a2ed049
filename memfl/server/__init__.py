"""The server side of a run, shared by every runtime:

- :mod:`~memfl.server.setup`      the data, model builder, federation, strategy and resumed checkpoint
- :mod:`~memfl.server.loop`       the one round loop: select -> instructions -> executor -> validate ->
                                  aggregate -> evaluate -> records -> checkpoint
- :mod:`~memfl.server.executor`   what the loop needs from a runtime (``Executor``, ``Candidate``, ``Outcome``)
- :mod:`~memfl.server.records`    the result records (every field, the same on every runtime) and the summary
- :mod:`~memfl.server.clock`      the virtual clock
- :mod:`~memfl.server.checkpoint` checkpoints (resume)
- :mod:`~memfl.server.progress`   progress output (a rich bar or log lines)

Nothing here imports :mod:`memfl.runtime`: the runtimes implement ``Executor`` and call the loop.
"""
