"""The training side of a GRPO step: trajectories -> micro-batches (``batch``), the PPO update
(``update``) and the step's record (``step``). ``mmsr.module.GRPOModule`` wires them into Lightning."""
