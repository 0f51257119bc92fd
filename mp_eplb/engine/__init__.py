"""The engine side: :class:`~mp_eplb.engine.state.EplbState` (all the engine sees) and the
host of its transfer worker (:mod:`.host`: a subprocess or, in thread mode, a thread)."""
