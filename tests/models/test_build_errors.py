"""Bad builder arguments and broken checkpoint files are refused early (when the builder is made, or before the
weights load), naming the argument or the file."""

import re
from pathlib import Path

import pytest

import mmsr.models.build as build
from mmsr.models.build import PretrainedPolicy, TinyQwen2_5_VL, save_policy
from mmsr.models.tokenizer import corpus_texts
from mmsr.models.tiny_qwen3_vl import TinyQwen3VL


class NoWeights:
    """Stands in for the model classes: a check that ran after the weights had loaded fails on this instead."""

    @staticmethod
    def from_pretrained(*args, **kwargs):
        raise AssertionError("the weights loaded before the check")


@pytest.fixture
def saved_qwen3_vl(tiny_qwen3_vl, tmp_path, monkeypatch):
    """The tiny Qwen3-VL saved without weights (16-pixel patches: the default processor's 14 do not fit)."""
    monkeypatch.setattr(build, "AutoModelForImageTextToText", NoWeights)
    return save_policy(tiny_qwen3_vl, tmp_path / "policy", weights=False)


def test_pixel_bounds_below_1_are_refused_when_the_builder_is_made():
    """transformers reads a 0 bound as a missing one: ``tool_image_min_pixels: 0`` built, then every image search
    failed ("size dict must contain 'shortest_edge'"); ``PretrainedPolicy(min_pixels=0)`` was dropped silently."""
    with pytest.raises(ValueError, match="^tool_image_min_pixels must be a whole number of pixels >= 1, got 0$"):
        PretrainedPolicy("acme/model", tool_image_min_pixels=0)
    with pytest.raises(ValueError, match="^PretrainedPolicy: min_pixels must be a whole number of pixels >= 1, got 0$"):
        PretrainedPolicy("acme/model", min_pixels=0)
    with pytest.raises(ValueError, match="^tool_image_max_pixels must be .* got -1$"):
        TinyQwen2_5_VL(tool_image_max_pixels=-1)
    with pytest.raises(ValueError, match="^TinyQwen2_5_VL: min_pixels must be .* got 0$"):
        TinyQwen2_5_VL(min_pixels=0)
    with pytest.raises(ValueError, match="^tool_image_min_pixels must be .* got 0$"):
        TinyQwen3VL(tool_image_min_pixels=0)


def test_tokenizer_jsonl_is_split_as_the_data_readers_split_it(tmp_path):
    """``str.splitlines`` cut a line at a raw U+2028 inside a string, and a blank line was parsed: both raised a
    JSONDecodeError naming no file. A bad line names file and line."""
    path = tmp_path / "texts.jsonl"
    path.write_text('{"text": "one\u2028two"}\n\n["three"]\n', encoding="utf-8")
    assert corpus_texts([str(path)]) == ["one\u2028two", "three"]
    path.write_text('{"text": "a"}\n\n{"text": \n', encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: invalid JSON (Expecting value)")):
        corpus_texts([str(path)])


@pytest.mark.parametrize(("name", "text"), [("preprocessor_config.json", "{bad"), ("mmsr_policy.json", ""),
                                            ("mmsr_policy.json", "[3136]")])  # fmt: skip
def test_a_broken_checkpoint_json_file_is_named_when_the_builder_is_made(saved_qwen3_vl, name, text):
    (saved_qwen3_vl / name).write_text(text)
    with pytest.raises(ValueError, match=f"^{re.escape(str(saved_qwen3_vl / name))}: (invalid JSON|expected a JSON object)"):
        PretrainedPolicy(str(saved_qwen3_vl))


def test_the_saved_tool_image_bounds_must_be_whole_numbers(saved_qwen3_vl):
    """A string bound raised TypeError ('>' not supported between 'int' and 'str'), naming nothing."""
    (saved_qwen3_vl / "mmsr_policy.json").write_text('{"tool_image_max_pixels": "9216"}')
    message = f"{saved_qwen3_vl / 'mmsr_policy.json'}: tool_image_max_pixels must be a whole number of pixels >= 1, got '9216'"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        PretrainedPolicy(str(saved_qwen3_vl))


def test_a_broken_chat_template_json_is_named_before_the_weights_load(saved_qwen3_vl):
    (saved_qwen3_vl / "chat_template.jinja").unlink()  # the template is then read from chat_template.json
    (saved_qwen3_vl / "chat_template.json").write_text("{")
    with pytest.raises(ValueError, match=f"^{re.escape(str(saved_qwen3_vl / 'chat_template.json'))}: invalid JSON"):
        PretrainedPolicy(str(saved_qwen3_vl)).build()


def test_a_directory_without_tokenizer_files_is_refused_before_the_weights_load(saved_qwen3_vl):
    """transformers built an empty tokenizer (1 token); prompts failed to encode only after the weights had loaded."""
    (saved_qwen3_vl / "tokenizer.json").unlink()
    (saved_qwen3_vl / "tokenizer_config.json").unlink()
    with pytest.raises(ValueError, match=f"^{re.escape(str(saved_qwen3_vl))}: the tokenizer \\(1 tokens\\) has no end-of-turn token '<\\|im_end\\|>'"):
        PretrainedPolicy(str(saved_qwen3_vl)).build()


def test_a_directory_without_either_processor_file_names_both(saved_qwen3_vl):
    (saved_qwen3_vl / "preprocessor_config.json").unlink()
    with pytest.raises(ValueError, match="cuts 14-pixel patches, the model's vision tower takes 16 "
                                         r"\(no settings in preprocessor_config.json or processor_config.json"):  # fmt: skip
        PretrainedPolicy(str(saved_qwen3_vl)).build()


def test_a_mistyped_local_path_is_refused_when_the_builder_is_made(tmp_path, monkeypatch):
    """It passed, and the build failed on the hub ("couldn't connect to huggingface.co"), naming no path."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for path in ("runs/demo/missing_export", "./missing_export", str(tmp_path / "missing_export") + "/"):
        with pytest.raises(FileNotFoundError, match=f"model directory {re.escape(str(Path(path)))} not found"):
            PretrainedPolicy(path)
    (tmp_path / "Qwen").mkdir()  # a folder of other models named like a hub namespace does not hide the hub's
    for hub_id in ("acme/missing_export", "Qwen/Qwen2.5-VL-7B-Instruct"):
        assert PretrainedPolicy(hub_id).tools is None  # made (offline, nothing read yet); the build would ask the hub


def test_a_hub_id_that_fails_to_load_is_named(monkeypatch):
    class Unreachable:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(build, "AutoConfig", Unreachable)
    with pytest.raises(OSError, match="^acme/missing_export: no such directory .* as a hub id: We couldn't connect"):
        PretrainedPolicy("acme/missing_export").build()


def test_a_torn_weights_file_is_named(tiny_policy, tmp_path):
    """An export or copy cut short leaves a ``model.safetensors`` whose header cannot be read: the error named no file
    (``SafetensorError: Error while deserializing header``), and it was the last line ``mmsr eval`` printed."""
    import mmsr.cli as cli

    save_policy(tiny_policy, tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5])
    with pytest.raises(OSError) as error:
        PretrainedPolicy(str(tmp_path)).build()
    assert cli.cause(error.value).startswith(f"OSError: {tmp_path}: its weights could not be loaded: SafetensorError")
