"""The pipeline: stages wired by defaults and @ references, finished stages skipped, changed ones rerun; distill."""

import json

import pytest
import yaml

from r1kit.config import ConfigError, DistillConfig, PipelineConfig
from r1kit.distill import distill_pipeline
from r1kit.pipeline.run import run_pipeline
from r1kit.pipeline.stages import fingerprint, resolve_stages

PROBLEMS = [("Tom has 3 apples and buys 4 more. How many apples?", "7", "3 + 4 = <<3+4=7>>7 apples."),
            ("A box holds 5 pens. How many pens are in 2 boxes?", "10", "2 x 5 = 10 pens."),
            ("Sara had 9 sweets and ate 2. How many are left?", "7", "9 - 2 = 7 sweets left."),
            ("Each of 4 kids has 3 cards. How many cards in all?", "12", "4 x 3 = 12 cards.")]


def _data(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"id": f"t{i}", "problem": p, "answer": a, "solution": s}) + "\n"
                            for i, (p, a, s) in enumerate(PROBLEMS * 3)))
    return path


def _config(model_dir, tmp_path, **changes) -> PipelineConfig:
    data = _data(tmp_path)
    stages = {
        "cold_data": {"kind": "sample", "teacher": "solutions"},
        "cold": {"kind": "sft", "steps": 2, "batch_size": 4, "eval_rows": 2, "lr": 1e-3},
        "rl": {"kind": "train", "steps": 1, "group_size": 2, "prompts_per_step": 2, "max_completion_tokens": 6,
               "eval_problems": 0, "rewards": {"accuracy": 1.0, "format": 0.2, "language": 0.1}},
    }
    for key, value in changes.items():
        stage, setting = key.split(".")
        stages[stage][setting] = value
    return PipelineConfig(model=str(model_dir), task="gsm8k", data=str(data), stages=stages, device="cpu",
                          eval={"data": str(data), "limit": 2, "samples": 1, "max_new_tokens": 6},
                          out=str(tmp_path / "run"))


def test_stages_take_the_previous_output_as_input(tiny_model_dir, tmp_path):
    cfg = _config(tiny_model_dir, tmp_path)
    cfg.stages["again"] = {"kind": "sft", "model": "@base", "data": ["@cold_data", str(cfg.data)], "steps": 1}
    cold_data, cold, rl, again = resolve_stages(cfg)
    run = tmp_path / "run"
    assert cold_data.config.out == str(run / "cold_data" / "traces.jsonl")
    assert cold_data.config.teacher == "solutions" and cold_data.config.task == "gsm8k"
    assert (cold.config.model, cold.config.data) == (str(tiny_model_dir), cold_data.config.out)
    assert rl.config.model == str(run / "cold" / "final") and rl.config.data == cfg.data
    assert rl.config.eval_data == cfg.eval["data"]  # held out: the evaluation's rows, not training rows
    assert (again.config.model, again.config.data) == (str(tiny_model_dir), [cold_data.config.out, cfg.data])
    # inputs that exist are fingerprinted, each file of a list on its own (cold_data's output is not written yet)
    assert set(fingerprint(again)["inputs"]) == {"model", "data[1]"}
    # an endpoint teacher takes no model of the pipeline's, and its stage depends on none
    cfg.stages["remote"] = {"kind": "sample", "teacher_url": "http://127.0.0.1:9/v1", "teacher_model": "r1"}
    remote = resolve_stages(cfg)[-1]
    assert remote.config.teacher == "default" and set(fingerprint(remote)["inputs"]) == {"data"}


@pytest.mark.parametrize(("stages", "message"), [
    ({"a": {"kind": "eval"}}, "stage 'a': kind must be one of sample, sft, train, got 'eval'"),
    ({"report": {"kind": "sft"}}, "stage 'report': choose another name"),
    ({"a": {"kind": "sft", "model": "@later", "data": "x.jsonl"}}, "stage 'a': @later names no earlier stage"),
    ({"a": {"kind": "sft"}}, "stage 'a' (sft): config (defaults and overrides): data: Field required"),
    ({"a": {"kind": "train", "grup_size": 4}}, "stage 'a' (train): config (defaults and overrides): grup_size"),
    ({"a": {"kind": "sample", "teacher_url": "http://127.0.0.1:9/v1"}},
     "stage 'a' (sample): config (defaults and overrides): teacher_url needs teacher_model"),
])
def test_bad_stages_are_refused_before_anything_runs(tmp_path, stages, message):
    cfg = PipelineConfig(stages=stages, out=str(tmp_path / "run"))
    with pytest.raises(ConfigError) as e:
        run_pipeline(cfg)
    assert str(e.value).startswith(message)
    assert not (tmp_path / "run").exists()


def _mtimes(run):
    return {p.name: (p / "stage.json").stat().st_mtime_ns for p in run.iterdir() if (p / "stage.json").is_file()}


def test_finished_stages_are_skipped_and_changed_ones_rerun(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    first = run_pipeline(_config(tiny_model_dir, tmp_path))
    assert set(first["stages"]) == {"base", "cold_data", "cold", "rl"}
    assert all(r["status"] == "done" for r in first["stages"].values())
    for name in ("base", "cold", "rl"):
        assert 0 <= first["stages"][name]["eval"]["pass@1"] <= 1
    report = (run / "report" / "index.md").read_text()
    assert "| cold | sft | done |" in report and "language consistency" in report
    assert (run / "report" / "curves.png").is_file()
    before = _mtimes(run)

    again = run_pipeline(_config(tiny_model_dir, tmp_path))
    assert _mtimes(run) == before  # nothing rerun, not even an evaluation
    assert again["stages"]["rl"]["summary"] == first["stages"]["rl"]["summary"]

    run_pipeline(_config(tiny_model_dir, tmp_path, **{"rl.lr": 1e-5}))
    after = _mtimes(run)
    assert [n for n in before if after[n] != before[n]] == ["rl"]
    assert yaml.safe_load((run / "rl" / "config.yaml").read_text())["lr"] == 1e-5

    run_pipeline(_config(tiny_model_dir, tmp_path, **{"cold.steps": 3, "rl.lr": 1e-5}))
    last = _mtimes(run)
    assert sorted(n for n in after if last[n] != after[n]) == ["cold", "rl"]  # rl's input changed

    # settings of where and how a stage runs do not make it run again
    run_pipeline(_config(tiny_model_dir, tmp_path, **{"cold.steps": 3, "rl.lr": 1e-5, "rl.save_every": 7,
                                                      "cold_data.concurrency": 2, "cold.keep_checkpoints": 5}))
    assert _mtimes(run) == last
    # a finished stage whose output is gone runs again, and so does what it feeds
    (run / "cold_data" / "traces.jsonl").unlink()
    run_pipeline(_config(tiny_model_dir, tmp_path, **{"cold.steps": 3, "rl.lr": 1e-5}))
    again = _mtimes(run)
    assert sorted(n for n in last if again[n] != last[n]) == ["cold_data"]  # the same traces: cold, rl unchanged
    assert (run / "cold_data" / "traces.jsonl").is_file()


def test_distill_is_sample_then_sft_of_the_student():
    cfg = DistillConfig(teacher="runs/teacher/final", student="default", task="countdown",
                        sample={"samples": 8}, sft={"epochs": 2})
    pipeline = distill_pipeline(cfg)
    assert pipeline.model == "default"
    assert pipeline.stages == {
        "sample": {"kind": "sample", "teacher": "runs/teacher/final", "teacher_url": None, "teacher_model": None,
                   "samples": 8},
        "sft": {"kind": "sft", "model": "@base", "data": "@sample", "epochs": 2}}
