"""Shared fixtures: the embedded model's folder and tokenizer, and a tiny random Llama on that tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def default_dir() -> Path:
    from r1kit.models import resolve_model

    return resolve_model("default")


@pytest.fixture(scope="session")
def tokenizer(default_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A 2-layer random Llama with the SmolLM2 tokenizer, saved as an HF folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture()
def data_dir(tmp_path) -> Path:
    """../shared/data when present, else a folder with a few rows in the same format."""
    if (SHARED_DATA / "gsm8k_test.jsonl").is_file():
        return SHARED_DATA
    rows = {
        "gsm8k_test.jsonl": [{"problem": "Tom has 3 apples and buys 4 more. How many?", "answer": "7"}],
        "math500_test.jsonl": [{"problem": "What is $\\frac{1}{2}+\\frac{1}{4}$?", "answer": "\\frac{3}{4}"}],
        "aime24.jsonl": [{"problem": "Find 2^10 mod 1000.", "answer": "24"}],
    }
    import json

    for name, items in rows.items():
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in items))
    return tmp_path


SCRIPT = "<think>Two plus two makes four</think>The answer is 4."


@pytest.fixture(scope="session")
def scripted_dir(tmp_path_factory, tokenizer) -> Path:
    """A 1-layer Llama that, after a chat prompt, always says SCRIPT and stops.

    Attention and MLP outputs are zeroed, so each next token depends on the current token alone; the
    script's tokens get one-hot embeddings and the LM head maps each to its successor. `<think>` and
    `</think>` are single added tokens, as in R1-style tokenizers.
    """
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    tok = copy.deepcopy(tokenizer)
    tok.add_tokens(["<think>", "</think>"])
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    chain = [tok(prompt, add_special_tokens=False)["input_ids"][-1], *tok.encode(SCRIPT, add_special_tokens=False),
             tok.eos_token_id]
    assert len(set(chain)) == len(chain), "the script's tokens must be unique"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight.zero_()
        model.model.layers[0].mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.normal_(std=0.01)
        model.lm_head.weight.zero_()
        for i, (token, successor) in enumerate(zip(chain, chain[1:], strict=False)):
            model.model.embed_tokens.weight[token] = 0.0
            model.model.embed_tokens.weight[token, i] = 1.0
            model.lm_head.weight[successor, i] = 10.0
    folder = tmp_path_factory.mktemp("scripted")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def micro_llama():
    """A one-layer random Llama with a 64-token vocabulary (seed 0): the smallest model an engine can serve."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, eos_token_id=0)
    return LlamaForCausalLM(config).eval()


def hf_greedy(model, prompt_ids: list[int], new_tokens: int, pad_id: int, **options) -> list[int]:
    """HF `generate`'s greedy continuation of one prompt: the reference the backends are held to."""
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=pad_id, **options)
    return out[0, len(prompt_ids) :].tolist()


def triton_interpreted(script: str) -> list[list[str]]:
    """The words of each line a Python script prints, run by Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    import os
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", script], env={**os.environ, "TRITON_INTERPRET": "1"},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return [line.split() for line in out.stdout.splitlines()]
