"""The server side of a run, shared by every runtime: set-up (:mod:`~memfl.server.setup`), the
virtual clock (:mod:`~memfl.server.clock`), checkpoints (:mod:`~memfl.server.checkpoint`) and the
results summary (:mod:`~memfl.server.records`)."""
