"""``mmsr eval`` accepts a question's candidate answers as it does its ground truth: EM and SubEM match any of
``Sample.answers``, and the judge is shown the candidates ("Other acceptable answers")."""

from dataclasses import replace

from mmsr.eval.run import Evaluator
from mmsr.reward.judge import OpenAIJudge
from mmsr.rollout.engine import ScriptedEngine
from tests.eval.test_judge import FakeOpenAI

R = "<reason>r</reason>"


def _with_candidates(fvqa_samples):
    """Two questions with aliases no ground truth contains, and the scripted answers naming only an alias."""
    s = [replace(fvqa_samples[0], candidate_answers=("Blue Lagoon", "Lagoon Two")),
         replace(fvqa_samples[1], candidate_answers=("Old Harbour",))]  # fmt: skip
    assert not any(c.lower() in x.ground_truth.lower() for x in s for c in x.candidate_answers)
    script = {s[0].id: [f"{R}<answer>Lagoon Two</answer>"],  # exactly the second candidate
              s[1].id: [f"{R}<answer>near the Old Harbour, I think</answer>"]}  # contains the candidate
    return s, script


def test_em_and_subem_match_a_candidate_answer_not_only_the_ground_truth(tiny_policy, fvqa_samples):
    s, script = _with_candidates(fvqa_samples)
    records = Evaluator(tiny_policy, ScriptedEngine(script, tiny_policy.tokenizer), {}).run(s, "on-demand", "dev")
    assert [r.answer for r in records] == ["Lagoon Two", "near the Old Harbour, I think"]
    assert [(r.em, r.subem) for r in records] == [(True, True), (False, True)]
    assert [r.candidate_answers for r in records] == [["Blue Lagoon", "Lagoon Two"], ["Old Harbour"]]


def test_the_judge_is_shown_the_candidate_answers(monkeypatch, tiny_policy, fvqa_samples):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    s, script = _with_candidates(fvqa_samples)
    with FakeOpenAI({"Lagoon Two": "<judge>Yes</judge>"}) as server:
        judge = OpenAIJudge(f"http://127.0.0.1:{server.port}/v1", "m", timeout_s=10)
        engine = ScriptedEngine(script, tiny_policy.tokenizer)
        records = Evaluator(tiny_policy, engine, {}, judge=judge).run(s, "on-demand", "dev")
    shown = [body["messages"][1]["content"].split("Other acceptable answers: ")[1].split("\n")[0] for body in server.bodies]
    assert sorted(shown) == ["Blue Lagoon, Lagoon Two", "Old Harbour"]  # requests may arrive in any order
    assert records[0].judge is True
