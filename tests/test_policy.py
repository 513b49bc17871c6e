"""Which model and dataset names a job may read (issue #16, items 3 and 5).

One classifier (`kd.names.classify`) decides embedded / local / Hub / S3 for every
name; the API policy, the preflight, the data loader and the model loader all use it.
A job submitted through the API never reads a path that is not absolute; a job started
from the command line may, resolved against its working directory and logged.
"""

from __future__ import annotations

import logging

import pytest

from kd import names
from kd.config import DistillConfig

# Spelt out (not names.ORIGIN_ENV): the variable is the contract with the service.
ORIGIN_ENV, API_ORIGIN = "LLM2SLM_JOB_ORIGIN", "api"
API = {ORIGIN_ENV: API_ORIGIN}


@pytest.fixture
def workdir(tmp_path, monkeypatch, corpus, tiny_teacher):
    """A working directory holding 'bench/results' (a data folder), 'runs' (a model
    folder) and 'data.jsonl': names that relative reads would find."""
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "bench" / "results" / "docs.jsonl").write_text(corpus.read_text())
    (tmp_path / "data.jsonl").write_text(corpus.read_text())
    (tmp_path / "runs").symlink_to(tiny_teacher, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(ORIGIN_ENV, raising=False)
    return tmp_path


@pytest.mark.parametrize(
    "name, what, kind, relative",
    [
        ("embedded:smollm2-135m", "model", "embedded", False),
        ("embedded", "dataset", "embedded", False),
        ("/abs/model", "model", "local", False),
        ("/abs/x.gguf", "model", "local", False),
        ("./model", "model", "local", True),
        ("../model", "model", "local", True),
        ("~/model", "model", "local", True),
        ("x.gguf", "model", "local", True),
        ("data.jsonl", "dataset", "local", True),
        ("a/b/../c", "dataset", "local", True),
        ("HuggingFaceTB/SmolLM2-135M", "model", "hub", False),
        ("gpt2", "model", "hub", False),
        ("wikitext", "dataset", "hub", False),
        ("s3://bucket/data", "dataset", "s3", False),
        ("embedded", "model", "hub", False),  # only datasets have a bare 'embedded'
    ],
)
def test_classify_by_spelling(name, what, kind, relative):
    src = names.classify(name, what, relative_ok=False)
    assert (src.kind, src.relative) == (kind, relative)


def test_a_hub_spelt_name_is_a_folder_only_where_relative_paths_are_allowed(workdir):
    """'bench/results' and 'runs' are spelt like Hub ids; the command line may mean the
    folders of that name in its working directory, the API never."""
    for name, what in (("bench/results", "dataset"), ("runs", "model")):
        assert names.classify(name, what, relative_ok=False).kind == "hub"
        src = names.classify(name, what, relative_ok=True)
        assert (src.kind, src.relative) == ("local", True)


def test_api_job_never_reads_a_relative_dataset(workdir, monkeypatch):
    """Regression (#16.3): in an API job 'bench/results' was read from the working
    directory through the Hub-id spelling; now every relative spelling is refused."""
    from kd.data import DataError, load_documents

    monkeypatch.setenv(ORIGIN_ENV, API_ORIGIN)
    for dataset in ("bench/results", "data.jsonl", "./data.jsonl"):
        with pytest.raises(DataError, match="relative|not an absolute path") as e:
            load_documents(DistillConfig(dataset=dataset))
        assert dataset in str(e.value)
    # eval_dataset goes through the same entry
    from kd.sources import read_source

    with pytest.raises(DataError, match="relative"):
        read_source("bench/results", None, None, None)


def test_api_job_never_loads_a_relative_model(workdir, monkeypatch):
    """Regression (#16.3): teacher_model='runs' was loaded from ./runs in an API job;
    the model loader and the job's preflight (model_files) now refuse it."""
    from kd.model_files import ModelFilesError, read_model
    from kd.models import ModelLoadError, resolve_source

    monkeypatch.setenv(ORIGIN_ENV, API_ORIGIN)
    for name in ("runs", "./runs"):
        with pytest.raises(ModelLoadError, match="relative|not an absolute path"):
            resolve_source(name)
        with pytest.raises(ModelFilesError, match="relative|not an absolute path"):
            read_model(name)
    assert resolve_source(str(workdir / "runs")).kind == "folder"  # absolute: fine


def test_server_preflight_reads_no_relative_model(workdir):
    """The API's preflight runs in the server: it must not read ./runs either, whatever
    the server's own environment says."""
    from kd.model_files import ModelFilesError
    from kd.preflight import preflight

    cfg = DistillConfig(teacher_model="runs", student_layers=1)
    assert preflight(cfg, relative_ok=True)["teacher"]["read_from"] == str(
        (workdir / "runs").resolve()
    )
    with pytest.raises(ModelFilesError, match="relative"):
        preflight(cfg, relative_ok=False)


def test_command_line_reads_relative_paths_and_logs_them(workdir, caplog, tiny_teacher):
    """A command-line job may use relative paths: resolved against its working
    directory, and the resolved path is stated in the log."""
    from kd.data import load_documents
    from kd.models import resolve_source

    with caplog.at_level(logging.INFO, logger="kd.names"):
        docs = load_documents(DistillConfig(dataset="bench/results"))
        src = resolve_source("runs")
    assert len(docs) == 120
    assert src.location == str(tiny_teacher.resolve())
    logged = caplog.text
    assert str(workdir / "bench" / "results") in logged
    assert str(tiny_teacher.resolve()) in logged


def test_api_policy_uses_the_same_classifier(workdir):
    """The API admits 'bench/results' only as a Hub id (and the job then reads it only
    as one); relative and S3 spellings are refused with the field named."""
    from serve_app.security import policy_problems
    from serve_app.settings import Settings

    settings = Settings(allowed_local_roots=[str(workdir)], allow_hub_datasets=False)
    refused = {
        "bench/results": "Hub sources are disabled",
        "data.jsonl": "must be absolute",
        "s3://bucket/x": "S3 sources are not supported",
    }
    for dataset, words in refused.items():
        problems = policy_problems(DistillConfig(dataset=dataset), settings)
        assert [(f, words in m) for f, m in problems] == [("dataset", True)], problems
    ok = DistillConfig(dataset=str(workdir / "data.jsonl"))
    assert policy_problems(ok, settings) == []


def test_service_marks_its_jobs_as_api_jobs():
    """The origin travels in the job's runtime_env (every process of the job inherits
    it) and a server's job_env cannot override it."""
    from serve_app.launcher import JobLauncher
    from serve_app.settings import Settings

    launcher = JobLauncher(Settings(job_env={ORIGIN_ENV: "cli", "X": "1"}))
    assert launcher.runtime_env()["env_vars"] == {**API, "X": "1"}


def test_train_job_preflight_refuses_relative_dataset_in_api_job(workdir, monkeypatch):
    from kd.data import DataError
    from train_job.cli import preflight

    monkeypatch.setenv(ORIGIN_ENV, API_ORIGIN)
    cfg = DistillConfig(dataset="data.jsonl")
    with pytest.raises(DataError, match="dataset 'data.jsonl' is not an absolute path"):
        preflight(cfg)


# ---------------------------------------------------------------------------------
# Resuming with a changed config (#16.5)
# ---------------------------------------------------------------------------------
def test_config_changes_split_model_data_fields_from_the_schedule():
    from kd.config import MODEL_DATA_FIELDS, config_changes

    old = DistillConfig(student_model="teacher:layers=2", lora_r=4).model_dump(mode="json")
    same = {"student_model": "teacher", "student_layers": 2, "lora_r": 4}  # other spelling
    assert config_changes(old, same) == ([], [])
    new = dict(same, student_layers=3, dataset="/d.jsonl", max_seq_len=64, lora_r=8)
    new |= {"max_steps": 50, "lr": 1e-4, "eval_every": 5}
    refused, allowed = config_changes(old, new)
    assert refused == [
        "student_layers: 2 -> 3",
        "dataset: 'embedded' -> '/d.jsonl'",
        "max_seq_len: 256 -> 64",
        "lora_r: 4 -> 8",
    ]
    assert allowed == ["max_steps: 25 -> 50", "lr: 0.001 -> 0.0001", "eval_every: 0 -> 5"]
    assert {"teacher_model", "student_model", "dataset", "max_seq_len", "lora_r"} <= set(
        MODEL_DATA_FIELDS
    )


@pytest.fixture(scope="module")
def checkpointed(tiny_teacher, corpus, tmp_path_factory):
    """A run trained 2 of 4 steps and saved by `python -m kd`'s checkpoint writer."""
    from kd.cli import save_checkpoint
    from kd.state import state_dict
    from kd.train import setup, train
    from tests.conftest import tiny_cfg

    cfg = tiny_cfg(tiny_teacher, corpus, max_steps=4, warmup_steps=1, lr=3e-3, lm_ce=0.0)
    run = setup(cfg, kept_layers=[0, 3])  # given layers: no selection pass (faster)
    run.cfg = cfg.model_copy(update={"max_steps": 2})
    train(run)
    out = tmp_path_factory.mktemp("resume") / "out"
    save_checkpoint(run, out)
    job = out.parent / "job.json"
    job.write_text(cfg.model_dump_json())
    return {"cfg": cfg, "state": state_dict(run), "out": out, "job": job}


def test_resume_with_a_new_lr_trains_at_the_new_lr(checkpointed):
    """Regression (#16.5): the checkpoint's lr (param groups, scheduler base_lrs) came
    back on resume; the resumed run's lr and weight decay now win, on its schedule."""
    from kd.optim import lr_factor
    from kd.state import load_state_dict
    from kd.train import setup, train

    state = checkpointed["state"]
    new = checkpointed["cfg"].model_copy(update={"lr": 1e-4, "weight_decay": 0.1})
    resumed = setup(new, kept_layers=state["kept_layers"])
    load_state_dict(resumed, state)
    assert [g["lr"] for g in resumed.optimizer.param_groups] == pytest.approx(
        [1e-4 * lr_factor(2, new)] * 2
    )
    assert [g["weight_decay"] for g in resumed.optimizer.param_groups] == [0.1, 0.0]
    assert resumed.optimizer.state  # Adam's moments still come from the checkpoint
    train(resumed)
    assert resumed.scheduler.get_last_lr() == pytest.approx([1e-4 * lr_factor(4, new)] * 2)


def test_kd_cli_resume_refuses_model_changes_and_states_schedule_changes(checkpointed, capsys):
    """Regression (#16.5): `python -m kd --resume` with other layers resumed the old
    ones; now exit 2 naming each changed model/data field, before anything loads. A
    schedule change is allowed and printed."""
    from kd.cli import main

    argv = ["--config", str(checkpointed["job"]), "--out", str(checkpointed["out"]), "--resume"]
    assert main([*argv, "student_layers=1", "seed=3"]) == 2
    err = capsys.readouterr().err
    assert "student_layers, seed: cannot resume" in err and "student_layers: 2 -> 1" in err
    from kd.cli import _parse, _resume_problem

    args = _parse([*argv, "lr=0.002"])
    assert _resume_problem(args, checkpointed["cfg"].model_copy(update={"lr": 0.002})) is None
    assert "resuming with changes: max_steps: 2 -> 4; lr: 0.003 -> 0.002" in capsys.readouterr().out
