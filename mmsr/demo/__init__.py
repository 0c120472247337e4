"""The CPU demo, ``mmsr demo``: a tiny VLM learns on-demand search in an offline world.

A product of its own beside the trainer, which it uses and which never imports it:

- ``run``: the ``mmsr demo`` command (world -> warm start -> evaluation -> GRPO -> evaluation);
- ``world``: the seeded world of landmarks (questions, images, image-search index, corpus, reading pages);
- ``reading``: the pages a random-weight model first learns to read (``SFTModule(reading=...)``);
- ``teacher``: the scripted RAG teacher whose episodes warm-start the policy (``SFTModule(teacher=...)``);
- ``tokenizer``: the weighted scaffold of the tiny tokenizers (``TinyQwen2_5_VL(scaffold=...)``);
- ``configs/``: the two stages' configs (``sft.yaml``, ``grpo.yaml``), ``templates/``: their prompts
  (``mmsr.demo:templates/round1.txt``), both package data found wherever mmsr is installed.
"""
