"""Moved: training-side batching is ``mmsr.train.batch`` (``collate``, ``pack_by_tokens``, ``TrainBatch``)."""

raise ImportError("mmsr.rollout.collate moved to mmsr.train.batch (collate, pack_by_tokens, TrainBatch)")
