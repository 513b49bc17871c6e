"""Generation quality: degeneration metrics by hand, teacher scoring, the report section."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from kd import genquality as gq
from kd.prompts import PromptSet
from kd.rollout import GenSettings
from tests.conftest import tiny_cfg


def test_repeat_4gram_rate_on_hand_made_lists():
    assert gq.repeat_ngram_rate([[1, 2, 3, 4, 5, 6]]) == 0.0
    # 1 2 3 4 1 2 3 4: 5 four-grams, (1 2 3 4) seen again once
    assert gq.repeat_ngram_rate([[1, 2, 3, 4, 1, 2, 3, 4]]) == pytest.approx(1 / 5)
    # pooled over sequences; a repeat across sequences does not count
    assert gq.repeat_ngram_rate([[7, 7, 7, 7, 7], [1, 2, 3, 4]]) == pytest.approx(1 / 3)
    assert gq.repeat_ngram_rate([[1, 2, 3]]) == 0.0  # too short: no 4-gram at all


def test_distinct_2_on_hand_made_lists():
    assert gq.distinct_n([[1, 2, 3, 4]]) == 1.0
    assert gq.distinct_n([[5, 5, 5, 5, 5]]) == pytest.approx(1 / 4)
    assert gq.distinct_n([[1, 2], [1, 2], [2, 1]]) == pytest.approx(2 / 3)  # pooled
    assert gq.distinct_n([[1]]) == 0.0


def test_select_is_fixed_by_seed_and_capped():
    pool = PromptSet([[i] for i in range(50)], None, [str(i) for i in range(50)])
    a, b = gq.select(pool, 32, seed=3), gq.select(pool, 32, seed=3)
    assert a.prompts == b.prompts and len(a) == 32 and a.texts == [str(p[0]) for p in a.prompts]
    assert gq.select(pool, 32, seed=4).prompts != a.prompts
    assert len(gq.select(pool, 99, seed=0)) == 50


@pytest.fixture(scope="module")
def lms(tiny_teacher, tiny_student):
    return (
        AutoModelForCausalLM.from_pretrained(tiny_teacher).eval(),
        AutoModelForCausalLM.from_pretrained(tiny_student).eval(),
    )


PROMPTS = [[5, 17, 99, 4], [8, 8, 31], [1000, 2000, 3000, 7, 9]]


def test_teacher_scoring_its_own_greedy_sample(lms):
    """Reverse KL of a model against itself is 0; the teacher's NLL of its own greedy
    tokens equals −log max p_T at each step (what greedy decoding picked)."""
    t, _ = lms
    g = GenSettings(max_new_tokens=5, greedy=True)
    conts = gq.continuations(t, PROMPTS, g, eos_id=-1, pad_id=0)
    assert [len(c) for c in conts] == [5, 5, 5]
    r = gq.score(t, t, PROMPTS, conts, pad_id=0)
    assert r["reverse_kl"] == pytest.approx(0.0, abs=1e-6)
    assert r["tokens"] == 15
    nll = 0.0
    for p, c in zip(PROMPTS, conts, strict=True):
        ids = torch.tensor([p + c])
        logp = torch.log_softmax(t(input_ids=ids).logits[0].double(), -1)
        for j, tok in enumerate(c):
            step = logp[len(p) - 1 + j]
            assert int(step.argmax()) == tok
            nll -= float(step.max())
    assert r["teacher_nll"] == pytest.approx(nll / 15, rel=1e-4)


def test_student_samples_score_worse_than_teacher_samples(lms):
    t, s = lms
    g = GenSettings(max_new_tokens=6)
    rows = {
        "teacher": gq.evaluate_model(t, t, PromptSet(PROMPTS), g, eos_id=-1, pad_id=0),
        "student": gq.evaluate_model(s, t, PromptSet(PROMPTS), g, eos_id=-1, pad_id=0),
    }
    assert rows["teacher"]["reverse_kl"] == pytest.approx(0.0, abs=1e-6)
    assert rows["student"]["reverse_kl"] > 0.01
    assert all(math.isfinite(r["teacher_nll"]) for r in rows.values())
    for r in rows.values():
        assert 0.0 <= r["repeat_4gram"] <= 1.0 and 0.0 < r["distinct_2"] <= 1.0
        assert len(r["greedy_ids"]) == 3


def test_section_and_markdown(lms, tokenizer):
    t, s = lms
    g = GenSettings(max_new_tokens=4)
    prompts = PromptSet(PROMPTS, None, ["first prompt", "second", "third"])
    kw = dict(eos_id=tokenizer.eos_token_id, pad_id=0)
    rows = {
        "teacher": gq.evaluate_model(t, t, prompts, g, **kw),
        "untrained_student": gq.evaluate_model(s, t, prompts, g, **kw),
        "student": gq.evaluate_model(s, t, prompts, g, **kw),
    }
    sec = gq.section(rows, prompts, tokenizer, g)
    import json

    json.dumps(sec)  # ready for report.json
    assert sec["n_prompts"] == 3 and set(sec["rows"]) == set(gq.ROWS)
    assert "greedy_ids" not in sec["rows"]["student"]
    assert [x["prompt"] for x in sec["side_by_side"]] == ["first prompt", "second", "third"]
    md = gq.render_markdown(sec)
    assert md.startswith("## Generation quality")
    assert "| trained student |" in md and "### Prompt 3" in md
    assert "**untrained student (ceiling)** (greedy):" in md


def test_heldout_prompts_from_blocks_and_embedded(tiny_teacher, corpus, tokenizer):
    from kd.data import build_datasets

    cfg = tiny_cfg(tiny_teacher, corpus, prompt_tokens=8)
    _, held = build_datasets(cfg, tokenizer)
    ps = gq.heldout_prompts(cfg, tokenizer, held, n=32, seed=0)
    assert 0 < len(ps) <= 32 and all(0 < len(p) <= 8 for p in ps.prompts)
    emb = gq.heldout_prompts(cfg.model_copy(update={"dataset": "embedded"}), tokenizer, held)
    assert len(emb) == 32 and "<|im_start|>user" in tokenizer.decode(emb.prompts[0])


# ---------------------------------------------------------------------------------
# In every report: the pipeline, report.json, report.md and the HTML page
# ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_teacher, corpus):
    """An off-policy run through kd.pipeline (what `python -m kd` and rank 0 call)."""
    from kd import pipeline
    from kd.train import setup, train

    out = tmp_path_factory.mktemp("gq-run")
    cfg = tiny_cfg(
        tiny_teacher, corpus, max_steps=2, warmup_steps=1, gen_eval_prompts=4, max_new_tokens=6
    )
    run = setup(cfg)
    before = pipeline.evaluate_before(run, out)
    train(run)
    metrics = pipeline.finalize(run, out, before, [], 1.0, 0.0)
    return out, before, metrics


def test_every_report_has_the_generation_section(finished, tokenizer):
    import json

    out, before, _ = finished
    stored = json.loads((out / "before.json").read_text())["generation"]
    assert set(stored["rows"]) == {"teacher", "untrained_student"}  # before training
    sec = json.loads((out / "report.json").read_text())["generation_quality"]
    assert sec["n_prompts"] == 4 and sec["max_new_tokens"] == 6
    assert set(sec["rows"]) == set(gq.ROWS)
    assert sec["rows"]["teacher"]["reverse_kl"] == pytest.approx(0.0, abs=1e-5)  # the floor
    for name in ("teacher", "untrained_student"):  # kept from before.json, not recomputed
        assert sec["rows"][name]["teacher_nll"] == pytest.approx(
            stored["rows"][name]["teacher_nll"], abs=1e-5
        )
        want = tokenizer.decode(stored["rows"][name]["greedy_ids"][0], skip_special_tokens=True)
        assert sec["side_by_side"][0][name] == want.strip()
    assert len(sec["side_by_side"]) == 3 and all(gq.ROWS[2] in s for s in sec["side_by_side"])
    md = (out / "report.md").read_text()
    assert "## Generation quality" in md and "### Prompt 3" in md
    assert "| teacher (floor) |" in md and "| untrained student (ceiling) |" in md
    assert "**trained student** (greedy):" in md


def test_gen_eval_prompts_zero_says_why_the_section_is_missing(tiny_teacher, corpus):
    from kd import pipeline, report
    from kd.train import setup

    run = setup(tiny_cfg(tiny_teacher, corpus, gen_eval_prompts=0))
    sec = pipeline.generation_after(run, pipeline.generation_before(run))
    assert sec == {"skipped": "gen_eval_prompts is 0; set it > 0 for this section"}
    lines = report.generation_lines(sec)
    assert lines[1] == "## Generation quality" and "gen_eval_prompts is 0" in lines[-1]


def test_report_page_shows_the_side_by_side_samples(finished):
    import json
    from html import escape

    from serve_app.report_page import render

    out = finished[0]
    rep = json.loads((out / "report.json").read_text())
    job = {"job_id": "kd-gq", "state": "succeeded", "created_at": 0.0, "config": rep["config"]}
    html = render(job, rep, None)
    assert '<table id="side-by-side">' in html and "<h2>Generation quality</h2>" in html
    for item in rep["generation_quality"]["side_by_side"]:
        for name in ("prompt", *gq.ROWS):
            assert escape(item[name] or "(empty)") in html
    assert "untrained student (ceiling)" in html and "reverse KL" in html
    skipped = rep | {"generation_quality": {"skipped": "gen_eval_prompts is 0"}}
    assert "Not evaluated: gen_eval_prompts is 0." in render(job, skipped, None)
