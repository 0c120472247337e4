"""A ``save_policy`` directory keeps the policy's banned tokens for plain transformers: its generation config's
``suppress_tokens`` are the ids ``Policy.mask_banned`` masks (``<|image_pad|>``, ``<|im_start|>``, ..., padded vocab
rows). Without them transformers' ``generate(do_sample=True)`` on the export sampled banned tokens, which mmsr's
engines never do. And ``PretrainedPolicy(path="~/...")`` expands the home directory."""

import torch
from transformers import AutoModelForImageTextToText, AutoTokenizer

from mmsr.models.build import PretrainedPolicy, save_policy
from mmsr.models.policy import BANNED_TOKENS


def banned_ids(policy) -> list[int]:
    return policy.banned_token_ids(policy.model.get_output_embeddings().weight.shape[0]).tolist()


def test_transformers_generate_on_the_export_never_samples_a_banned_token(tiny_policy, tmp_path):
    save_policy(tiny_policy, tmp_path)
    tokenizer, model = AutoTokenizer.from_pretrained(tmp_path), AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    vocab = tokenizer.get_vocab()
    assert sorted(model.generation_config.suppress_tokens) == banned_ids(tiny_policy)
    assert {vocab[t] for t in BANNED_TOKENS if t in vocab} <= set(model.generation_config.suppress_tokens)
    chat = [{"role": "user", "content": "Who painted this?"}]
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    torch.manual_seed(0)  # a flat temperature: without suppress_tokens ~1% of draws are banned, ~1,000 draws here
    with torch.no_grad():
        out = model.generate(ids, do_sample=True, temperature=5.0, max_new_tokens=64, num_return_sequences=16,
                             eos_token_id=None, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    assert not torch.isin(out[:, ids.shape[1] :], torch.tensor(banned_ids(tiny_policy))).any()


def test_the_export_reloads_as_the_same_policy_with_the_same_banned_set(tiny_policy, tmp_path):
    """The new field changes nothing mmsr reads: weights, stop ids and banned ids as saved, the live config untouched."""
    before = tiny_policy.model.generation_config.to_dict()
    save_policy(tiny_policy, tmp_path)
    assert tiny_policy.model.generation_config.to_dict() == before  # a copy was written
    loaded = PretrainedPolicy(str(tmp_path)).build()
    assert banned_ids(loaded) == banned_ids(tiny_policy)
    assert loaded.stop_token_ids() == tiny_policy.stop_token_ids()
    saved, reloaded = tiny_policy.model.state_dict(), loaded.model.state_dict()
    assert saved.keys() == reloaded.keys() and all(torch.equal(saved[k], reloaded[k]) for k in saved)
    save_policy(loaded, tmp_path / "again")  # re-exported (the demo's GRPO stage saves what it loaded): same ids
    again = AutoModelForImageTextToText.from_pretrained(tmp_path / "again")
    assert again.generation_config.suppress_tokens == banned_ids(tiny_policy)


def test_a_path_under_the_home_directory_is_expanded(tiny_policy, tmp_path, monkeypatch):
    """``~/ckpt`` was refused as "not found (a relative path: resolved against the working directory ...)"."""
    save_policy(tiny_policy, tmp_path / "ckpt")
    monkeypatch.setenv("HOME", str(tmp_path))
    builder = PretrainedPolicy("~/ckpt")
    assert builder.path == str(tmp_path / "ckpt")
    assert builder.build().tokenizer.get_vocab() == tiny_policy.tokenizer.get_vocab()
