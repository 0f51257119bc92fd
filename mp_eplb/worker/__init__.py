"""The transfer worker: its logic (:mod:`.logic`), message loop (:mod:`.loop`), subprocess entry
(:mod:`.boot`, standard library only, then :mod:`.main`) and failpoints (:mod:`.failpoints`).

Nothing here imports :mod:`mp_eplb.engine`, and this package imports nothing itself, so
``python -m mp_eplb.worker.boot`` starts without torch.
"""
