"""Secrets in configs: a key pasted where a variable's name goes is refused without being quoted, and a config
written out keeps valid YAML / JSON with its secrets masked (``mmsr.tools.secrets``)."""

from __future__ import annotations

import json

import pytest
import yaml

import mmsr.tools.secrets
from mmsr.tools.secrets import SECRET_ENVS, redact, redact_config, register_secret_env
from mmsr.tools.web.host import UploadHost
from mmsr.tools.web.providers import Serper
from mmsr.tools.web.reader import JinaReader

# as users paste them: an OpenAI-style key (a '-': no variable's name) and Jina / Serper-style keys, which are
# valid names, so only their long run of letters and digits gives them away
PASTED = ["sk-test-0123456789abcdef", "jina_0123456789abcdefABCDEF", "a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9"]


@pytest.fixture(autouse=True)
def no_pasted_keys(monkeypatch):
    """Keys refused here are masked in this test only (the process-wide set would mask them in later tests)."""
    monkeypatch.setattr(mmsr.tools.secrets, "_pasted", set())


@pytest.mark.parametrize("key", PASTED)
def test_a_key_given_as_a_variable_name_is_refused_without_quoting_it(key):
    with pytest.raises(ValueError, match="looks like a key pasted where the variable's name goes") as refused:
        register_secret_env(key)
    assert key not in str(refused.value) and key[:8] not in str(refused.value)
    assert key not in SECRET_ENVS
    # jsonargparse's errors quote the whole config given: the pasted key is masked from now on
    assert redact(f"api_key_env='{key}'") == "api_key_env='[redacted pasted key]'"


def test_each_component_refuses_it_where_it_only_ran_without_a_key_or_quoted_it(monkeypatch):
    monkeypatch.setenv("SERPER_API_KEY", "serper-fake-0123456789")
    for build in (lambda: JinaReader(api_key_env=PASTED[1]),  # ran anonymously, the key in the logged config
                  lambda: Serper(api_key_env="serper_0123456789abcdefXYZ"),  # "needs an API key in ... <the key>"
                  lambda: UploadHost("https://h/{sha256}", "https://p/{sha256}", auth_env=PASTED[0])):  # fmt: skip
        with pytest.raises(ValueError, match="api_key_env / token_env / auth_env setting") as refused:
            build()
        assert "0123456789" not in str(refused.value)


def test_real_variable_names_are_taken(monkeypatch):
    for name in ("SERPER_API_KEY", "my_provider_key", "_K2", "OPENAI_API_KEY_PROJECT_7"):
        register_secret_env(name)
        assert name in SECRET_ENVS
    register_secret_env(None)
    register_secret_env("")
    monkeypatch.setenv("KEY_0123456789abcdef0", "sk-real-value-0123")  # key-like, but a variable that is set
    register_secret_env("KEY_0123456789abcdef0")
    assert "KEY_0123456789abcdef0" in SECRET_ENVS


def test_a_config_with_a_secret_is_masked_and_stays_valid(monkeypatch):
    monkeypatch.setenv("MMSR_TEST_API_KEY", "sk-test-0123456789abcdef")
    # a plain ``redact`` made the first value a YAML list, and its quotes' contents a partial key
    text = "trainer:\n  default_root_dir: sk-test-0123456789abcdef\n  x: runs/sk-test-0123456789abcdef/a\n"
    masked = redact_config(text)
    assert "0123456789" not in masked
    assert yaml.safe_load(masked) == {"trainer": {"default_root_dir": "[redacted MMSR_TEST_API_KEY]",
                                                  "x": "runs/[redacted MMSR_TEST_API_KEY]/a"}}  # fmt: skip
    as_json = redact_config(json.dumps({"url": "https://h/?key=sk-test-0123456789abcdef"}))
    assert json.loads(as_json) == {"url": "https://h/?key=[redacted MMSR_TEST_API_KEY]"}
    plain = "# a comment stays\nmodel:  {lr: 0.001}\n"
    assert redact_config(plain) is plain  # no secret: the text as written


def test_mmsr_fit_refuses_it_and_its_traceback_does_not_quote_it(monkeypatch, capsys):
    """jsonargparse's error quotes the whole config given (``Given value: Namespace(... api_key_env='sk-...')``),
    three times in the traceback ``mmsr`` prints."""
    import mmsr.cli as cli
    from tests.conftest import ROOT

    key = "sk-abc-0123456789xyz"
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(cli.sys, "argv", ["mmsr", "fit", "-c", "configs/smoke.yaml", "-c", "configs/tools/web_text_search.yaml",
                                          "--model.text_search.init_args.tool.init_args.provider.init_args.api_key_env", key])  # fmt: skip
    with pytest.raises(SystemExit):
        cli.console()
    err = capsys.readouterr().err
    assert "looks like a key pasted where the variable's name goes" in err.splitlines()[-1]
    assert "0123456789" not in err and "[redacted pasted key]" in err
