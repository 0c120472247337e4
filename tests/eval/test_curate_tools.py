"""``mmsr curate`` without a search tool is refused before any rollout: its on-demand rollouts had every search fail
("no image_search tool is configured"), and a question the model answered correctly without searching was labelled
search_free, silently (``mmsr eval`` refuses the same, ``mmsr.eval.cli.SEARCHING``)."""

import pytest
import yaml

from tests.conftest import FVQA

DATA = ["--data", str(FVQA / "fvqa_dev.jsonl")]


@pytest.mark.parametrize("source", [["--policy", "p.yaml"], ["--model-dir", "m"]], ids=["policy", "model-dir"])
def test_a_policy_without_tools_is_refused_before_the_data_and_model_load(tmp_path, capsys, source):
    from mmsr.eval.curate import main

    with pytest.raises(SystemExit) as exit_:  # neither p.yaml, m nor the data exist: the refusal comes first
        main([*source, "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "c.parquet")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"curation's rollouts search, and {source[0]} brings no tools: give them with --tools" in err
    assert "labelled search_free" in err and not (tmp_path / "c.parquet.rollouts.jsonl").exists()


def test_a_tools_file_or_a_checkpoint_without_a_tool_is_refused(tmp_path, monkeypatch):
    from mmsr.eval import load
    from mmsr.eval.curate import main

    out = ["--out", str(tmp_path / "c.parquet")]
    (tmp_path / "none.yaml").write_text(yaml.safe_dump({"image_search": None, "text_search": None}))
    with pytest.raises(SystemExit, match=rf"mmsr curate: error: curation's rollouts search, but no tool is configured "
                                         rf"\(--tools {tmp_path / 'none.yaml'}\): give them"):  # fmt: skip
        main(["--policy", str(tmp_path / "no-policy.yaml"), "--tools", str(tmp_path / "none.yaml"), *DATA, *out])
    # a checkpoint whose run configured no tools (its policy is not needed here: the refusal comes before any rollout)
    monkeypatch.setattr(load, "load_checkpoint", lambda *a, **k: load.Loaded(None, None, {"image_search": None, "text_search": None}))
    with pytest.raises(SystemExit, match=r"no tool is configured \(the tools of --ckpt's run config\)"):
        main(["--ckpt", "run.ckpt", *DATA, *out])
    assert not (tmp_path / "c.parquet.rollouts.jsonl").exists()
