"""The wandb run's config holds the whole run config (``mmsr.callbacks.run_dir.LoggedConfig``), not only the
module's hparams, which leave out its policy, engine, tools and reward."""

from pathlib import Path


def test_wandb_run_config_holds_the_components(scripted_run):
    (run_file,) = Path(scripted_run.trainer.default_root_dir).glob("wandb/offline-run-*/run-*.wandb")
    data = run_file.read_bytes()  # protobuf records: config keys are stored as plain strings
    for key in ("model.engine.class_path", "model.policy.vocab_size", "model.image_search.top_k"):
        assert key.encode() in data, key
