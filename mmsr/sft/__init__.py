"""``mmsr.sft``: the supervised warm start on a scripted teacher's episodes (``SFTModule``, in ``module``).

The injected teacher drives the real ``RolloutLoop`` through a ``ScriptedEngine`` with the
real tools, so the trajectories carry the same contexts, observations, images and loss masks as GRPO
rollouts. The loss is the token-mean negative log-likelihood of the teacher's turns (mask 1);
prompts, observations and image tokens (mask 0) are context only, and the LM head runs only where a
teacher's token is next (``mmsr.train.batch.sampled_logprobs``, as in the GRPO update). A random-weight
model can first spend ``reading_steps`` on language modelling over packed documents (``reading``), so
that it can copy names out of search results before it imitates the teacher.

Teacher and documents are injected (``class_path`` entries): the CPU demo's are
``mmsr.demo.teacher.RAGTeacher`` and ``mmsr.demo.reading.ReadingCorpus``.

``episodes`` counts and warns of the teacher turns an episode never trained; ``lm`` is the next-token
prediction of the reading steps (``lm_loss``, ``lm_nll``).
"""

from mmsr.sft.lm import lm_loss, lm_nll
from mmsr.sft.module import SFTModule, Teacher, TextBatches, refuse_bad_turns

__all__ = ["SFTModule", "Teacher", "TextBatches", "lm_loss", "lm_nll", "refuse_bad_turns"]
