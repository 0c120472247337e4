"""``GRPOModule``'s held-out evaluation: ``data.val_files`` in Lightning's validation loop, one greedy episode a
prompt (``mmsr eval``'s protocol) scored by the training reward.

``HeldOutValidation`` is a mixin of ``GRPOModule`` (``mmsr.module``): it reads the module's ``loop``, ``sampling``,
``engine``, ``sync_weights``, ``stop_every_rank`` and reward stage (``mmsr.module_rewards``)."""

from __future__ import annotations

from dataclasses import replace

from mmsr.checkpoint import gather_per_rank
from mmsr.data.sample import Sample
from mmsr.metrics import episode_metrics, held_out_metrics


class HeldOutValidation:
    """Lightning's validation hooks for held-out episodes."""

    def on_validation_epoch_start(self) -> None:
        self.sync_weights()  # the engine holds the last rollout's weights, from before that step's updates
        self._val_episodes: list[dict] = []
        self._val_error: Exception | None = None  # raised at the epoch's end, on every rank (validation_step)

    def validation_step(self, batch: list[Sample], batch_idx: int) -> None:
        """One greedy episode per held-out prompt (``mmsr eval``'s protocol), scored by the reward. An error (a
        tool's, a judge's) is kept, the rank's later batches skipped, and every rank stops on it at the epoch's end
        (``on_validation_epoch_end``): ranks may run different numbers of batches, so none can agree per batch, and
        a rank that stopped alone left the others waiting in the epoch's gather."""
        if self._val_error is not None:
            return
        # the live stage (StageProgressBar) says these are held-out episodes, not a training step's
        stage, runs = self.stage, self.loop.runs
        try:
            self.stage = "val rollout"
            trajs = self.loop.run(batch, 1, replace(self.sampling, temperature=0.0))
            # greedy draws no noise: training's sampling streams stay as without validation, so a run resumed
            # from a checkpoint saved before it samples the same episodes
            self.loop.runs = runs
            self.stage = "val reward"
            rewards = self.checked_rewards(trajs, batch).tolist()
            for t, reward, detail in zip(trajs, rewards, self.reward_details(trajs, batch)):
                self._val_episodes.append(episode_metrics(t, batch, reward, detail, self.loop.settings))
        except Exception as exc:  # not BaseException: an interrupt stops this process at once
            self._val_error = exc
        finally:
            self.stage = stage

    def on_validation_epoch_end(self) -> None:
        self.stop_every_rank(self._val_error)  # before the gather, where a rank that stopped alone left the others
        if hasattr(self.engine, "sleep"):
            self.engine.sleep()
        episodes = [e for rank in gather_per_rank(self._val_episodes) for e in rank]
        if episodes:  # the same values on every rank (pooled before the means)
            self.log_dict(held_out_metrics(episodes), batch_size=len(episodes), sync_dist=True)
