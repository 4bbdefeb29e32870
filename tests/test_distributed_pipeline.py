"""Rejection sampling and the pipeline under torchrun on CPU (gloo, 2 processes, the tiny random model): `sample` with
a local teacher writes the bytes one process writes, fresh or resumed, and a pipeline's stages give one process's
figures and weights, and are skipped alike on every rank when it runs again.

Run as a script by torchrun (`file.py WORKER ARGS...`), this file is also the workers of the tests below."""

import json
import os
import sys
from pathlib import Path

import pytest
import yaml
from test_distributed import assert_weights_close, run, torchrun
from test_pipeline import _config, _mtimes

from r1kit.cli import build_parser
from r1kit.config import PipelineConfig, SampleConfig


def keep_all(candidates: list, *args) -> list[None]:
    """A judgement that keeps every trace: a random model's fail every filter, and what is compared is which traces
    are drawn and where they are written."""
    return [None] * len(candidates)


def sample_settings(model_dir, folder: Path, out: str) -> SampleConfig:
    """7 addition prompts in rounds of 3, 2 traces each: over 2 ranks rounds of 1 + 2 prompts, then of 0 + 1."""
    return SampleConfig(teacher=str(model_dir), task="addition", limit=7, chunk=3, samples=2, temperature=1.0,
                        max_new_tokens=6, batch_size=4, seed=5, device="cpu", out=str(folder / out))


def sample_worker(*configs: str) -> None:
    """torchrun's worker: `sample` of each config (a YAML file), every trace kept, in one process group (a group
    set up again after one was destroyed can read the first one's stale addresses from torchrun's store)."""
    from r1kit import distributed
    from r1kit.sample import run as sample_run

    sample_run.judge = keep_all
    with distributed.launched("cpu"):
        for path in configs:
            sample_run.run_sample(SampleConfig(**yaml.safe_load(Path(path).read_text())))


def saved(cfg: SampleConfig | PipelineConfig) -> str:
    """cfg as a YAML file beside its output, in its order (a pipeline's stages run in theirs)."""
    path = Path(cfg.out).with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
    return str(path)


def test_sample_over_two_processes_writes_what_one_process_writes_fresh_or_resumed(tiny_model_dir, tmp_path,
                                                                                   monkeypatch):
    from r1kit.sample import run as sample_run

    monkeypatch.setattr(sample_run, "judge", keep_all)
    sample_run.run_sample(sample_settings(tiny_model_dir, tmp_path, "one.jsonl"))
    one = tmp_path / "one.jsonl"
    expected, lines = one.read_bytes(), one.read_text().splitlines(keepends=True)
    assert len(lines) == 14 and len({json.loads(line)["answer"] for line in lines}) == 14  # sampled, not greedy
    # a run killed in its 2nd round, with half a row written: one round done, its 3 prompts' 6 traces
    resumed = tmp_path / "resumed.jsonl"
    first_round = "".join(lines[:6]).encode()
    resumed.write_bytes(first_round + b'{"prompt": "What')
    progress = json.loads(sample_run.progress_path(one).read_text())
    sample_run.save_progress(resumed, {**progress, "rounds": 1, "bytes": len(first_round), "counts": {"kept": 6}})
    torchrun(__file__, "sample_worker", saved(sample_settings(tiny_model_dir, tmp_path, "two.jsonl")),
             saved(sample_settings(tiny_model_dir, tmp_path, "resumed.jsonl")))
    for out in ("two.jsonl", "resumed.jsonl"):
        assert (tmp_path / out).read_bytes() == expected, out
        assert json.loads(sample_run.progress_path(tmp_path / out).read_text()) == progress, out


def pipeline_config(model_dir, tmp_path: Path, out: str) -> PipelineConfig:
    """test_pipeline's stages (sample by the rows' solutions, SFT, GRPO), each model evaluated on 2 rows."""
    return _config(model_dir, tmp_path).model_copy(update={"out": str(tmp_path / out)})


def pipeline_worker(config: str, folder: str) -> None:
    """torchrun's worker: the pipeline of config (a YAML file); what it returns on each rank, in folder."""
    from r1kit.pipeline.run import run_pipeline

    result = run_pipeline(PipelineConfig(**yaml.safe_load(Path(config).read_text())))
    (Path(folder) / f"result-{os.environ['RANK']}.json").write_text(json.dumps(result, default=str))


def records(run_dir: Path) -> dict[str, dict]:
    """The stage records of a pipeline's folder, by stage."""
    return {p.parent.name: json.loads(p.read_text()) for p in run_dir.glob("*/stage.json")}


def test_pipeline_over_two_processes_matches_one_process_and_skips_finished_stages_on_every_rank(
        tiny_model_dir, tmp_path):
    from r1kit.pipeline.run import EVAL_KEYS, run_pipeline

    run_pipeline(pipeline_config(tiny_model_dir, tmp_path, "one"))
    two = pipeline_config(tiny_model_dir, tmp_path, "two")
    config = saved(two)
    run("-m", "r1kit.cli", "pipeline", "--config", config, "--nproc", "2")  # torchrun's 2
    expected, got = records(tmp_path / "one"), records(tmp_path / "two")
    assert set(got) == set(expected) == {"base", "cold_data", "cold", "rl"}
    assert all(r["status"] == "done" for r in got.values())
    for name, record in expected.items():
        if "eval" in record:
            for key in EVAL_KEYS:
                assert got[name]["eval"][key] == pytest.approx(record["eval"][key], rel=1e-6), (name, key)
    assert got["cold_data"]["summary"] == expected["cold_data"]["summary"]
    assert (tmp_path / "two" / "cold_data" / "traces.jsonl").read_bytes() == (
        tmp_path / "one" / "cold_data" / "traces.jsonl").read_bytes()
    for name in ("cold", "rl"):
        assert_weights_close(tmp_path / "two" / name / "final", tmp_path / "one" / name / "final")
    assert (tmp_path / "two" / "report" / "index.md").is_file()
    # run again: every rank skips every stage and evaluation, and returns the records as written
    before = _mtimes(tmp_path / "two")
    torchrun(__file__, "pipeline_worker", config, str(tmp_path))
    assert _mtimes(tmp_path / "two") == before
    for rank in range(2):
        assert json.loads((tmp_path / f"result-{rank}.json").read_text())["stages"] == got, rank


@pytest.mark.parametrize("name", ["sample", "pipeline", "distill"])
def test_nproc_is_taken_by_sample_pipeline_and_distill(name):
    args, extra = build_parser().parse_known_args([name, "--nproc", "2"])
    assert args.nproc == 2 and not extra


if __name__ == "__main__":
    globals()[sys.argv[1]](*sys.argv[2:])
