"""`r1kit demo`: its size per machine, and a second run into the same folder."""

import r1kit.demo as demo
from r1kit.config import DemoConfig, TrainConfig
from r1kit.rl.runlog import read_jsonl_rows


def test_demo_sizes_itself():
    cpu = demo.demo_config(DemoConfig(device="cpu"))
    assert cpu.time_budget_s == 240 and cpu.task == "addition" and cpu.eval_problems == 32
    assert demo.demo_config(DemoConfig(device="cpu", time_budget_s=5)).time_budget_s == 5


def test_the_demo_run_again_sets_the_earlier_run_aside(tiny_model_dir, tmp_path, monkeypatch, capsys):
    def tiny(cfg: DemoConfig) -> TrainConfig:  # the demo's run on the tiny model, in seconds
        return TrainConfig(model=str(tiny_model_dir), task="addition", group_size=4, prompts_per_step=2,
                           max_completion_tokens=6, steps=2, eval_problems=4, device="cpu", save_every=1,
                           time_budget_s=600, out=cfg.out)

    monkeypatch.setattr(demo, "demo_config", tiny)
    monkeypatch.setenv("COLUMNS", "1000")  # rich would break the long paths
    out = tmp_path / "demo"
    demo.run_demo(DemoConfig(out=str(out)))
    assert "earlier run" not in capsys.readouterr().err
    demo.run_demo(DemoConfig(out=str(out)))
    (aside,) = tmp_path.glob("demo.old-*")
    assert f"{out} held an earlier run: moved it to {aside}" in capsys.readouterr().err
    for run in (out, aside):  # each with its own checkpoints, events, metrics and report; nothing mixed
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-1", "step-2"]
        assert len(list((run / "tensorboard").iterdir())) == 1
        assert (run / "report" / "index.md").is_file() and (run / "final").is_dir()
        assert [r["step"] for r in read_jsonl_rows(run / "metrics.jsonl")] == [0, 1, 2, 2]  # before, 2 steps, after
