import pytest

from tests.conftest import FVQA


@pytest.fixture(scope="session")
def tiny_qwen3_vl():
    """A random-weight Qwen3-VL of the real architecture with a small BPE tokenizer (fp32)."""
    from mmsr.demo.tokenizer import Scaffold
    from mmsr.models.tiny_qwen3_vl import TinyQwen3VL

    texts = [str(FVQA / "fvqa_dev.jsonl"), str(FVQA / "search" / "corpus.jsonl")]
    return TinyQwen3VL(tokenizer_texts=texts, scaffold=Scaffold(), seed=0).build()


@pytest.fixture(params=["tiny_policy", "tiny_qwen3_vl"], ids=["qwen2_5_vl", "qwen3_vl"])
def vl_policy(request):
    """Each vision-language family: the tiny Qwen2.5-VL and the tiny Qwen3-VL."""
    return request.getfixturevalue(request.param)
