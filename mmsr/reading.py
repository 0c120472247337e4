"""Moved: the reading corpus is ``mmsr.demo.reading.ReadingCorpus``; ``lm_loss`` is ``mmsr.sft.lm_loss``."""

raise ImportError("mmsr.reading moved to mmsr.demo.reading (class_path: mmsr.demo.reading.ReadingCorpus); "
                  "lm_loss is mmsr.sft.lm_loss")  # fmt: skip
