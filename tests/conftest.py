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
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
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
