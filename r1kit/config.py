"""Typed configs, one per command: defaults < YAML file < command-line flags < key=value overrides."""

from __future__ import annotations

import argparse
import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A config that does not validate; the message names the source and each bad key."""


class Config(BaseModel):
    """Base of every command's config: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    # settings that change how or where a command runs, not what it produces
    run_settings: ClassVar[frozenset[str]] = frozenset({"out", "device"})

    def work(self) -> dict[str, Any]:
        """The settings that decide what the command produces: two configs equal here do the same work."""
        return self.model_dump(exclude=set(self.run_settings))


class EvalConfig(Config):
    """`r1kit eval`: sample k completions per problem and score them."""

    model: str = Field("default", description="'default', a .gguf file or a local HF folder")
    task: str = Field("gsm8k", description="a built-in task (see `r1kit tasks list`)")
    data: str | None = Field(None, description="JSONL file for data-backed tasks (gsm8k, math500, aime, jsonl)")
    task_args: dict[str, Any] = Field(default_factory=dict,
                                      description="task options, e.g. task_args.digits=3 (see `r1kit tasks show`)")
    samples: int = Field(4, ge=1, description="k: completions sampled per problem")
    temperature: float = Field(0.6, ge=0, description="sampling temperature; 0 is greedy")
    top_p: float = Field(0.95, gt=0, le=1, description="nucleus sampling mass")
    top_k: int = Field(0, ge=0, description="keep the k most likely tokens; 0 keeps all")
    min_p: float = Field(0.0, ge=0, lt=1, description="drop tokens below min_p times the top probability")
    max_new_tokens: int = Field(1024, ge=1, description="completion length limit in tokens")
    limit: int | None = Field(None, ge=1, description="evaluate only the first L problems")
    template: Literal["auto", "r1zero", "chat", "chat_plain", "raw"] = Field(
        "auto", description="prompt template (auto: chat for instruct models, r1zero for base models)")
    seed: int = Field(0, description="sampling seed")
    batch_size: int | None = Field(None, ge=1, description="sequences generated together (default: 512 with "
                                   "the engine on a GPU, 64 otherwise)")
    backend: Literal["auto", "hf", "engine"] = Field(
        "auto", description="generation backend (auto: the engine on a GPU, hf elsewhere)")
    compile: bool = Field(False, description="torch.compile the engine's decode layers and sampler (compiled "
                          "layers decoded the embedded model's GSM8K eval no faster on the H200; compiling costs "
                          "~15 s on a machine that has not compiled them before)")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1, ...")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="auto: bf16 on GPU")
    out: str = Field("runs/eval", description="output folder for results.json, samples.jsonl, summary.md")


def fsdp_trains_all_weights(cfg: TrainConfig | SFTConfig) -> TrainConfig | SFTConfig:
    """The config, unless it asks FSDP to shard a LoRA run (train's and sft's rule alike)."""
    if cfg.parallel == "fsdp" and cfg.lora_r:
        raise ValueError("parallel=fsdp shards full fine-tuning; LoRA's model and adapters fit on every GPU, so "
                         "train LoRA with parallel=ddp (the default)")
    return cfg


class TrainConfig(Config):
    """`r1kit train`: GRPO with rule-based rewards (R1-Zero when started from a base model)."""

    # batch_size: sequences generated together; batching never changes what a sequence samples. parallel: a run
    # sharded or not computes the same step (within float tolerance)
    run_settings: ClassVar[frozenset[str]] = frozenset({"out", "device", "resume", "save_every", "keep_checkpoints",
                                                        "batch_size", "parallel"})

    model: str = Field("default", description="'default', a .gguf file or a local HF folder")
    task: str = Field("addition", description="a built-in task (see `r1kit tasks list`)")
    data: str | None = Field(None, description="JSONL training data for data-backed tasks")
    task_args: dict[str, Any] = Field(default_factory=dict, description="task options, e.g. task_args.high=99")
    template: Literal["auto", "r1zero", "chat", "chat_plain", "raw"] = Field(
        "auto", description="prompt template (auto: chat for instruct models, r1zero for base models)")
    rewards: dict[str, Any] = Field(default_factory=lambda: {"accuracy": 1.0},
                                    description="reward weights, e.g. rewards.format=0.2 (see README)")
    group_size: int = Field(8, ge=2, description="G: completions per prompt")
    prompts_per_step: int = Field(16, ge=1, description="prompts (groups) per step")
    max_prompt_tokens: int = Field(512, ge=1, description="longer prompts are skipped with a warning")
    max_completion_tokens: int = Field(256, ge=1, description="completion length limit in tokens")
    temperature: float = Field(1.0, gt=0, description="rollout sampling temperature")
    top_p: float = Field(1.0, gt=0, le=1, description="rollout nucleus mass")
    top_k: int = Field(0, ge=0, description="rollout top-k; 0 keeps all")
    loss_type: Literal["grpo", "bnpo", "dapo", "dr_grpo"] = Field("grpo", description="loss aggregation")
    advantage_scale: Literal["group", "batch", "none"] = Field("group", description="advantage normalization")
    beta: float = Field(0.0, ge=0, description="KL weight to the reference model (0 loads no reference)")
    clip_low: float = Field(0.2, ge=0, description="ratio clip below 1")
    clip_high: float = Field(0.2, ge=0, description="ratio clip above 1 (DAPO clip-higher: 0.28)")
    num_iterations: int = Field(1, ge=1, description="mu: optimization passes over each batch of rollouts")
    old_logprobs: Literal["rollout", "recompute"] = Field(
        "rollout", description="old logprobs from the rollout, or one no-grad pass of the trainer's forward")
    dynamic_sampling: bool = Field(False, description="drop groups of equal rewards and sample more prompts")
    max_rollout_rounds: int = Field(4, ge=1, description="dynamic sampling: rollout rounds per step at most")
    mask_truncated: bool = Field(False, description="leave completions cut at the length limit out of the loss")
    lr: float = Field(1e-6, gt=0, description="learning rate")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field("constant", description="decay after warmup")
    warmup_steps: int = Field(0, ge=0, description="linear warmup (optimizer steps)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient norm clip")
    micro_batch_size: int = Field(32, ge=1, description="sequences per forward/backward (gradient accumulation)")
    gradient_checkpointing: bool = Field(False, description="recompute activations to save memory")
    lora_r: int = Field(0, ge=0, description="LoRA rank; 0 trains all weights")
    lora_alpha: int = Field(32, ge=1, description="LoRA alpha")
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp", description="under torchrun: ddp keeps a whole copy of the model, gradients and Adam state on every "
        "rank; fsdp shards them N ways (FSDP2: each decoder layer, then the rest), for full fine-tuning of a model "
        "one GPU cannot hold, each rank generating from a whole copy of the weights (bf16 on a GPU) gathered after "
        "every update (not with LoRA). One process trains alike with either")
    steps: int = Field(100, ge=1, description="training steps")
    time_budget_s: float | None = Field(None, gt=0, description="stop after this many seconds of training")
    seed: int = Field(0, description="seed of data order and sampling")
    eval_every: int = Field(0, ge=0, description="held-out evaluation every N steps (0: only before and after)")
    eval_problems: int = Field(256, ge=0, description="held-out problems (0: no evaluation)")
    eval_samples: int = Field(1, ge=1, description="samples per held-out problem at eval_temperature")
    eval_temperature: float = Field(1.0, ge=0, description="temperature of sampled evaluation (greedy is also run)")
    eval_task_args: dict[str, Any] = Field(default_factory=dict,
                                           description="task options of the held-out rows (seed: 10000 unless set)")
    eval_data: str | None = Field(None, description="JSONL of held-out rows for data-backed tasks")
    save_every: int = Field(50, ge=0, description="checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept")
    resume: str | None = Field(None, description="'latest' or a checkpoint folder to continue from")
    backend: Literal["auto", "hf", "engine"] = Field(
        "auto", description="rollout backend (auto: the engine on a GPU, hf elsewhere)")
    batch_size: int = Field(256, ge=1, description="sequences generated together")
    device: str = Field("auto", description="auto, cpu, cuda")
    out: str = Field("runs/train", description="run folder")

    @model_validator(mode="after")
    def _fsdp_trains_all_weights(self) -> TrainConfig:
        return fsdp_trains_all_weights(self)


class SFTConfig(Config):
    """`r1kit sft`: supervised fine-tuning on reasoning traces, loss on the assistant's tokens only."""

    # parallel: a run sharded or not computes the same step (within float tolerance)
    run_settings: ClassVar[frozenset[str]] = frozenset({"out", "device", "resume", "save_every", "keep_checkpoints",
                                                        "parallel"})

    model: str = Field("default", description="'default', a .gguf file or a local HF folder")
    data: str | list[str] = Field(description="JSONL traces: `messages` (chat), or `prompt` + `reasoning` + "
                                  "`answer`; several files as a list (data=[a.jsonl,b.jsonl]) are mixed")
    eval_data: str | None = Field(None, description="JSONL of held-out traces (default: eval_rows rows of data)")
    eval_rows: int = Field(64, ge=0, description="rows of data held out for the eval loss when eval_data is unset")
    template: Literal["auto", "r1zero", "chat", "chat_plain", "raw"] = Field(
        "auto", description="prompt template of prompt/reasoning/answer rows (use the one you evaluate with)")
    max_seq_len: int = Field(2048, ge=8, description="longer examples are left out, with a count")
    packing: bool = Field(True, description="pack examples into one row without padding (off: padded length "
                          "buckets)")
    batch_size: int = Field(32, ge=1, description="examples per optimizer step")
    micro_batch_tokens: int = Field(16384, ge=8, description="tokens per forward/backward (gradient accumulation)")
    epochs: float = Field(1.0, gt=0, description="passes over the data (steps, when set, wins)")
    steps: int | None = Field(None, ge=1, description="optimizer steps (default: from epochs)")
    lr: float = Field(2e-5, gt=0, description="learning rate")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field("cosine", description="decay after warmup")
    warmup_steps: int = Field(10, ge=0, description="linear warmup (optimizer steps)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient norm clip")
    gradient_checkpointing: bool = Field(False, description="recompute activations to save memory")
    lora_r: int = Field(0, ge=0, description="LoRA rank; 0 trains all weights")
    lora_alpha: int = Field(32, ge=1, description="LoRA alpha")
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp", description="under torchrun: ddp keeps a whole copy of the model, gradients and Adam state on every "
        "rank; fsdp shards them N ways (FSDP2: each decoder layer, then the rest), for full fine-tuning of a model "
        "one GPU cannot hold (not with LoRA, nor with eval_task on several ranks). One process trains alike with "
        "either")
    eval_task: str | None = Field(None, description="also measure held-out accuracy (greedy and sampled) on this "
                                  "task's rows, never trained on, with the evaluations (e.g. to compare with GRPO)")
    eval_task_data: str | None = Field(None, description="JSONL of those rows, for data-backed tasks")
    eval_task_args: dict[str, Any] = Field(default_factory=dict, description="its options (a generated task's "
                                           "seed: 10000 unless set)")
    eval_problems: int = Field(256, ge=1, description="held-out problems of eval_task")
    eval_max_new_tokens: int = Field(256, ge=1, description="completion length limit of that evaluation")
    eval_temperature: float = Field(1.0, ge=0, description="temperature of its sampled evaluation")
    eval_every: int = Field(50, ge=0, description="evaluate every N steps (0: only before and after)")
    save_every: int = Field(200, ge=0, description="checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept")
    resume: str | None = Field(None, description="'latest' or a checkpoint folder to continue from")
    time_budget_s: float | None = Field(None, gt=0, description="stop after this many seconds of training")
    seed: int = Field(0, description="seed of the data order")
    device: str = Field("auto", description="auto, cpu, cuda")
    out: str = Field("runs/sft", description="run folder")

    @model_validator(mode="after")
    def _fsdp_trains_all_weights(self) -> SFTConfig:
        return fsdp_trains_all_weights(self)


class FilterConfig(Config):
    """What a verified trace must also pass to be kept (rejection sampling's filters)."""

    require_format: bool = Field(True, description="reasoning inside <think>...</think>, then a non-empty answer")
    min_language: float = Field(0.95, ge=0, le=1, description="least share of reasoning words in the prompt's "
                                "script (language consistency)")
    max_tokens: int | None = Field(None, ge=1, description="longest trace kept, in tokens (default: max_new_tokens); "
                                   "a trace cut at the length limit is never kept")
    repeat_ngram: int = Field(8, ge=2, description="a run of this many words ...")
    repeat_times: int = Field(4, ge=2, description="... occurring this often marks a repetition loop")
    dedup: bool = Field(True, description="drop a trace equal to one already kept for the same prompt "
                        "(whitespace and case ignored)")
    keep_per_prompt: int | None = Field(None, ge=1, description="keep at most this many traces per prompt")


class SampleConfig(Config):
    """`r1kit sample`: rejection sampling: a teacher's traces that the task's verifier and the filters accept."""

    run_settings: ClassVar[frozenset[str]] = frozenset({"out", "device", "concurrency", "timeout_s", "max_retries",
                                                        "batch_size", "teacher_api_key_env"})

    teacher: str = Field("default", description="a model r1kit loads ('default', .gguf, HF folder), or "
                         "'solutions': traces built from the rows' own worked solutions (cold start, no model)")
    teacher_url: str | None = Field(None, description="an OpenAI-compatible endpoint instead (hosted R1, vLLM, "
                                    "Ollama, r1kit serve), e.g. http://127.0.0.1:8000/v1")
    teacher_model: str | None = Field(None, description="the model name to ask the endpoint for")
    teacher_api_key_env: str = Field("R1KIT_TEACHER_API_KEY", description="environment variable holding the "
                                     "endpoint's key")
    concurrency: int = Field(8, ge=1, description="endpoint requests in flight at once")
    timeout_s: float = Field(600, gt=0, description="endpoint request timeout")
    max_retries: int = Field(8, ge=0, description="retries of a request that failed with 429/5xx or timed out")
    task: str = Field("gsm8k", description="a built-in task: its prompts, and its verifier judges the traces")
    data: str | None = Field(None, description="JSONL file for data-backed tasks (gsm8k, math500, aime, jsonl)")
    task_args: dict[str, Any] = Field(default_factory=dict, description="task options, e.g. task_args.n=500")
    limit: int | None = Field(None, ge=1, description="sample for the first L prompts only")
    solution_field: str = Field("solution", description="teacher solutions: the row field with the worked solution")
    template: Literal["auto", "r1zero", "chat", "chat_plain", "raw"] = Field(
        "auto", description="prompt template of a local teacher")
    samples: int = Field(4, ge=1, description="N: traces generated per prompt")
    temperature: float = Field(0.6, ge=0, description="sampling temperature")
    top_p: float = Field(0.95, gt=0, le=1, description="nucleus sampling mass")
    max_new_tokens: int = Field(1024, ge=1, description="trace length limit in tokens")
    min_reward: float = Field(1.0, description="least verifier score of a kept trace")
    filters: FilterConfig = Field(default_factory=FilterConfig, description="filters.<name>=value (see README)")
    chunk: int = Field(64, ge=1, description="prompts per round; a rerun continues after the last finished round")
    batch_size: int = Field(256, ge=1, description="sequences a local teacher generates together")
    seed: int = Field(0, description="sampling seed")
    device: str = Field("auto", description="auto, cpu, cuda")
    out: str = Field("runs/traces.jsonl", description="JSONL file of kept traces (progress beside it)")

    @model_validator(mode="after")
    def _endpoint_names_its_model(self) -> SampleConfig:
        if self.teacher_url and not self.teacher_model:
            raise ValueError("teacher_url needs teacher_model: the model name the endpoint serves")
        return self


class PipelineConfig(Config):
    """`r1kit pipeline`: the R1 recipe as stages, each stage's output the next one's input."""

    model: str = Field("default", description="the base model ('default', .gguf, HF folder): `@base` in stages")
    task: str = Field("gsm8k", description="the task sample and train stages use unless they name another")
    data: str | None = Field(None, description="its JSONL training data")
    task_args: dict[str, Any] = Field(default_factory=dict, description="its options")
    stages: dict[str, dict[str, Any]] = Field(
        description="name -> {kind: sample | sft | train, any setting of that command}, in order (YAML); "
        "`@name` is a stage's output, `@base` the base model")
    eval: dict[str, Any] | None = Field(default_factory=dict, description="`r1kit eval` settings for the base "
                                        "model and every stage that makes a model (null: no evaluation)")
    device: str = Field("auto", description="auto, cpu, cuda")
    out: str = Field("runs/pipeline", description="folder: a subfolder per stage, report/")


class DistillConfig(Config):
    """`r1kit distill`: a teacher's verified traces into a student by SFT, the student evaluated before and after."""

    teacher: str = Field("default", description="a model r1kit loads, or 'solutions' (the rows' worked solutions)")
    teacher_url: str | None = Field(None, description="an OpenAI-compatible endpoint as teacher instead")
    teacher_model: str | None = Field(None, description="the model name to ask the endpoint for")
    student: str = Field("default", description="the model to train ('default', .gguf, HF folder)")
    task: str = Field("gsm8k", description="the task whose prompts the teacher answers and whose verifier judges")
    data: str | None = Field(None, description="its JSONL training data")
    task_args: dict[str, Any] = Field(default_factory=dict, description="its options")
    sample: dict[str, Any] = Field(default_factory=dict, description="more `r1kit sample` settings, e.g. "
                                   "sample.samples=8")
    sft: dict[str, Any] = Field(default_factory=dict, description="more `r1kit sft` settings, e.g. sft.epochs=3")
    eval: dict[str, Any] | None = Field(default_factory=dict, description="`r1kit eval` settings of the student's "
                                        "evaluation, e.g. eval.data=gsm8k_test.jsonl (null: none)")
    device: str = Field("auto", description="auto, cpu, cuda")
    out: str = Field("runs/distill", description="folder: sample/, sft/, evaluations, report/")


class ServedModelConfig(Config):
    """One model of a multi-model server."""

    name: str = Field(description="the name clients use")
    model: str = Field(description="'default', a .gguf file or a local HF folder")


class RouteConfig(Config):
    """How the model name `auto` picks a model: hard questions to the reasoner, the rest to the fast one."""

    reasoner: str = Field(description="name of the reasoning model")
    fast: str = Field(description="name of the fast model")
    rule: Literal["keywords", "length", "classifier"] = Field("keywords", description="how to decide")
    keywords: list[str] = Field(default_factory=lambda: ["prove", "solve", "calculate", "compute", "how many",
                                                         "derive", "step by step", "why"],
                                description="rule keywords: any of these (case-insensitive) goes to the reasoner")
    min_chars: int = Field(200, ge=0, description="rule length: prompts this long or longer go to the reasoner")
    classifier: str | None = Field(None, description="rule classifier: module:function(text) -> bool (reasoner?)")


class GateConfig(Config):
    """The model name `gate`: sample several answers and answer only when they agree (or pass a verifier)."""

    model: str = Field(description="name of the model that answers")
    samples: int = Field(5, ge=2, le=64, description="answers sampled per question")
    min_agreement: float = Field(0.6, gt=0, le=1, description="share of samples that must agree (or verify)")
    verifier: str | None = Field(None, description="module:function(answer_text) -> bool; default: majority vote")
    temperature: float = Field(0.6, ge=0, description="sampling temperature of the gate's samples")


class UpstreamConfig(Config):
    """An OpenAI-compatible endpoint (a frontier API, vLLM, another r1kit serve) that answers what the local models
    visibly struggle with: the gate's questions whose samples disagree, and those a route rule sends it."""

    url: str = Field(description="its base URL, e.g. https://api.deepseek.com or http://127.0.0.1:8001/v1")
    model: str = Field(description="the model name it serves")
    api_key_env: str | None = Field(None, description="the environment variable holding its API key (the key "
                                    "itself never goes in the file)")
    name: str = Field("upstream", description="what route.reasoner / route.fast call it")
    timeout_s: float = Field(120.0, gt=0, description="seconds to wait for its answer")
    max_retries: int = Field(1, ge=0, description="retries on refused connections, timeouts, 429 and 5xx")


class ServeConfig(Config):
    """`r1kit serve`: an OpenAI-compatible server with the reasoning trace apart from the answer."""

    model: str = Field("default", description="'default', a .gguf file or a local HF folder")
    name: str | None = Field(None, description="model name clients use (default: the folder name)")
    models: list[ServedModelConfig] = Field(default_factory=list, description="several models (YAML); replaces model")
    route: RouteConfig | None = Field(None, description="serve the name `auto` by this routing rule (YAML)")
    gate: GateConfig | None = Field(None, description="serve the name `gate` by sampling and consensus (YAML)")
    upstream: UpstreamConfig | None = Field(None, description="escalate to this endpoint when the gate's samples "
                                            "disagree or a route names it (YAML)")
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port (0: any free port)")
    api_key: str | None = Field(None, description="require 'Authorization: Bearer KEY' (or set R1KIT_API_KEY)")
    max_body_bytes: int = Field(1_000_000, ge=1, description="larger request bodies are refused (413)")
    max_prompt_tokens: int = Field(4096, ge=1, description="longer prompts are refused (400)")
    max_tokens: int = Field(2048, ge=1, description="the most tokens a request may ask for (400 above)")
    default_max_tokens: int = Field(512, ge=1, description="completion length when a request sets none")
    max_concurrent: int = Field(64, ge=1, description="requests in flight at once; more are refused (429)")
    max_sequences_per_request: int = Field(16, ge=1, description="the most sequences (n x prompts) one request "
                                           "may ask for; more is refused (400)")
    kv_cache_tokens: int = Field(65_536, ge=16, description="KV cache size in tokens")
    prefill_chunk_tokens: int = Field(2048, ge=16, description="prompt tokens prefilled a step: a longer prompt "
                                      "is prefilled a chunk a step, the running streams decoding in between")
    stream_interval_ms: float = Field(10, ge=0, description="a stream's chunks go out at most this often, the "
                                      "tokens that arrive meanwhile together (0: a chunk each engine step)")
    device: str = Field("auto", description="auto, cpu, cuda")

    @model_validator(mode="after")
    def _gate_fits_a_request(self) -> ServeConfig:
        # the gate's samples are one request's sequences: more than a request may hold would refuse every question
        if self.gate is not None and self.gate.samples > self.max_sequences_per_request:
            raise ValueError(f"gate.samples {self.gate.samples} is over max_sequences_per_request "
                             f"{self.max_sequences_per_request}: raise it or sample less")
        return self


class ChatConfig(Config):
    """`r1kit chat`: a terminal chat, streaming, the reasoning dimmed."""

    model: str | None = Field(None, description="chat with this model in-process ('default', .gguf, HF folder)")
    url: str | None = Field(None, description="or with a running r1kit/OpenAI-compatible server, e.g. "
                            "http://127.0.0.1:8000")
    api_key: str | None = Field(None, description="bearer key for --url (or set R1KIT_API_KEY)")
    name: str | None = Field(None, description="model name to ask for (default: the server's first)")
    temperature: float = Field(0.6, ge=0, description="sampling temperature")
    max_tokens: int = Field(1024, ge=1, description="reply length limit in tokens")
    device: str = Field("auto", description="auto, cpu, cuda (with --model)")


class DemoConfig(Config):
    """`r1kit demo`: GRPO on held-out-checked addition with the embedded model, sized to the machine."""

    time_budget_s: float | None = Field(None, gt=0, description="training seconds (default: 420 on GPU, 240 on CPU)")
    device: str = Field("auto", description="auto, cpu, cuda")
    out: str = Field("runs/demo", description="run folder")


def _set_dotted(target: dict, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for p in parents:
        target = target.setdefault(p, {})
    target[last] = value


def _yaml_value(text: str) -> Any:
    """A value as YAML reads it, or the text itself where it is not YAML (`@stage`, `a: b: c`)."""
    try:
        return yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        return text


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`key=value` strings into a nested dict; values are read as YAML (`3` is an int, `[a, b]` a list)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value")
        _set_dotted(out, key.replace("-", "_"), _yaml_value(value))
    return out


def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_yaml(path: str | Path) -> Any:
    """A YAML file's content; its errors name the file and line."""
    try:
        with open(path, "rb") as f:  # a stream, so that yaml's messages name the file, not "<unicode string>"
            return yaml.safe_load(f)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML ({': '.join(p for p in (e.context, e.problem) if p)})") from None
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read config ({e})") from None


def _config_in(annotation: Any) -> type[BaseModel] | None:
    """The config class inside an annotation (FilterConfig, list[ServedModelConfig], RouteConfig | None)."""
    if typing.get_origin(annotation) is None and isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((found for arg in typing.get_args(annotation) if (found := _config_in(arg))), None)


def _config_at(cls: type[BaseModel] | None, loc: tuple) -> type[BaseModel] | None:
    """The config class that holds the key at `loc` (a nested config's key, a list item's), or None."""
    for part in loc[:-1]:
        if cls is None or isinstance(part, int):  # an int is a list index: the list's item class holds the key
            continue
        field = cls.model_fields.get(part)
        cls = _config_in(field.annotation) if field else None
    return cls


def _unknown_key(cls: type[Config], loc: tuple, values: dict[str, Any]) -> str:
    """Why a key is not allowed: a task option given outside task_args, or a near miss of a field."""
    key, dotted = str(loc[-1]), ".".join(map(str, loc))
    if len(loc) == 1 and "task" in cls.model_fields and "task_args" in cls.model_fields:
        from r1kit.tasks import TASKS, task_options

        task = values.get("task") or cls.model_fields["task"].default
        if isinstance(task, str) and task in TASKS and key in task_options(task):
            value = values[key] if isinstance(values[key], str) else json.dumps(values[key])
            return f"{key}: unknown option; task options go under task_args (task_args.{key}={value})"
    owner = _config_at(cls, loc)
    close = difflib.get_close_matches(key, list(owner.model_fields), n=1) if owner else []
    return f"{dotted}: unknown option" + (f"; did you mean {dotted[: -len(key)]}{close[0]}?" if close else "")


def _problem(err: dict[str, Any]) -> str:
    """One validation error as `key: what is wrong` (a check across keys has no key of its own)."""
    where, message = ".".join(map(str, err["loc"])), err["msg"].removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


def load_config(cls: type[Config], path: str | Path | None = None, *layers: dict[str, Any]) -> Config:
    """Build cls from a YAML file and then each layer of values in turn, later layers winning."""
    values: dict[str, Any] = {}
    source = "defaults"
    if path:
        source = str(path)
        loaded = _read_yaml(path) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a config is a mapping of keys to values")
        values = loaded
    for layer in layers:
        values = _merge(values, layer)
    try:
        return cls(**values)
    except ValidationError as e:
        problems = "; ".join(_unknown_key(cls, err["loc"], values) if err["type"] == "extra_forbidden"
                             else _problem(err) for err in e.errors())
        raise ConfigError(f"config ({source} and overrides): {problems}") from None


def _flag_type(annotation: Any) -> tuple[Any, list[str] | None]:
    """(argparse type, choices) for a field annotation; None type for fields without a flag."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = args[0] if len(args) == 1 else str if str in args else annotation  # a list: key=[a, b]
    if typing.get_origin(annotation) is Literal:
        return str, list(typing.get_args(annotation))
    if annotation is bool:
        return "bool", None
    if annotation in (int, float, str):
        return annotation, None
    return None, None


def add_config_arguments(parser: argparse.ArgumentParser, cls: type[Config]) -> None:
    """A --flag per scalar field of cls (help from its description), --config FILE and key=value overrides."""
    parser.add_argument("--config", metavar="FILE", help="YAML file of settings (flags and overrides win)")
    for name, field in cls.model_fields.items():
        kind, choices = _flag_type(field.annotation)
        if kind is None:
            continue
        flag = "--" + name.replace("_", "-")
        default = field.get_default(call_default_factory=True)
        help_ = field.description if default is None or field.is_required() else \
            f"{field.description} (default: {default})"
        if kind == "bool":
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            parser.add_argument(flag, dest=name, type=kind, choices=choices, default=None, help=help_)
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="any setting, nested ones dotted (e.g. task_args.digits=3)")


def config_from_args(cls: type[Config], args: argparse.Namespace) -> Config:
    """The config a parsed command line describes."""
    flags = {name: getattr(args, name) for name in cls.model_fields if getattr(args, name, None) is not None}
    return load_config(cls, args.config, flags, parse_overrides(args.overrides))
