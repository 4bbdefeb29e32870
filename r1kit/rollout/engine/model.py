"""A plain-PyTorch forward of the Llama family (Llama, Mistral, Qwen2, Qwen3) over a paged KV cache.

It holds references to the HF model's own parameter tensors, never copies, so optimizer steps on the
policy are seen by the next rollout. When the engine runs in another dtype than the policy (bf16
rollouts of fp32 master weights), it keeps one preallocated buffer per parameter, and for a peft LoRA
model one merged buffer (W + scale * B @ A) per adapted layer; `sync_weights()` refreshes them in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from r1kit.rollout.engine.attention import register_cache

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32, as HF's Llama does."""
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of (tokens, heads, head_dim) with (tokens, 1, head_dim) cos and sin."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class PagedDecoder:
    """The decoder's forward for prefill (whole prompts) and decode (one token per sequence)."""

    def __init__(self, model, num_slots: int, block_size: int, dtype: torch.dtype | None = None):
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft: the wrapped LM
        config = inner.config
        if config.model_type not in SUPPORTED:
            raise ValueError(f"the rollout engine runs {', '.join(SUPPORTED)} models, not {config.model_type!r}; "
                             "use backend=hf")
        self.config, self.rotary = config, inner.model.rotary_emb
        params = {n.replace(".base_layer", ""): p for n, p in inner.named_parameters() if ".lora_" not in n}
        params.setdefault("lm_head.weight", params["model.embed_tokens.weight"])
        self.dtype = dtype or params["model.embed_tokens.weight"].dtype
        self.device = params["model.embed_tokens.weight"].device
        # LoRA layers: one buffer holding W + scale * B @ A, recomputed by sync_weights()
        self._merged = [(name, module) for name, module in inner.named_modules()
                        if hasattr(module, "base_layer") and hasattr(module, "lora_A")]
        merged = {name + ".weight" for name, _ in self._merged}
        self.w: dict[str, torch.Tensor] = {}
        self._shadowed: list[tuple[torch.Tensor, torch.Tensor]] = []
        for name, p in params.items():
            if p.dtype == self.dtype and name not in merged:
                self.w[name] = p.data  # the policy's own storage
            else:
                self.w[name] = torch.empty_like(p.data, dtype=self.dtype)
                if name not in merged:
                    self._shadowed.append((p.data, self.w[name]))
        self.sync_weights()
        self.layers = config.num_hidden_layers
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        self.qk_norm = "model.layers.0.self_attn.q_norm.weight" in self.w
        # one slot past the blocks: where padded rows of a captured decode step write their KV
        self.block_size, self.scratch_slot = block_size, num_slots
        shape = (self.layers, num_slots + 1, self.kv_heads, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.cache_key = register_cache(self)
        self.max_len = min(num_slots, config.max_position_embeddings)
        # rotary tables for every position a sequence can reach, indexed instead of recomputed each step
        position_ids = torch.arange(self.max_len, device=self.device)[None]
        cos, sin = self.rotary(torch.zeros((), dtype=torch.float32, device=self.device), position_ids)
        self.cos, self.sin = cos[0].to(self.dtype), sin[0].to(self.dtype)

    @torch.no_grad()
    def sync_weights(self) -> None:
        """Refresh the engine's buffers from the policy in place: dtype copies and merged LoRA weights
        (nothing to do for weights it shares)."""
        for source, buffer in self._shadowed:
            buffer.copy_(source)
        for name, layer in self._merged:
            weight = layer.base_layer.weight.float()
            for adapter in layer.active_adapters:
                if adapter in layer.lora_A:
                    a, b = layer.lora_A[adapter].weight.float(), layer.lora_B[adapter].weight.float()
                    weight = weight + layer.scaling[adapter] * (b @ a)
            self.w[name + ".weight"].copy_(weight)

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, self.w[name + ".weight"], self.w.get(name + ".bias"))

    def _qkv(self, x: torch.Tensor, i: int, positions: torch.Tensor):
        p = f"model.layers.{i}.self_attn."
        q = self._linear(x, p + "q_proj").view(-1, self.heads, self.head_dim)
        k = self._linear(x, p + "k_proj").view(-1, self.kv_heads, self.head_dim)
        v = self._linear(x, p + "v_proj").view(-1, self.kv_heads, self.head_dim)
        if self.qk_norm:
            q = rms_norm(q, self.w[p + "q_norm.weight"], self.eps)
            k = rms_norm(k, self.w[p + "k_norm.weight"], self.eps)
        cos, sin = self.cos[positions, None, :], self.sin[positions, None, :]
        return rotate(q, cos, sin), rotate(k, cos, sin), v

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, attend) -> torch.Tensor:
        """Hidden states of a flat batch of tokens; attend(q, k, v, layer) writes the cache and attends."""
        x = F.embedding(ids, self.w["model.embed_tokens.weight"])
        for i in range(self.layers):
            p = f"model.layers.{i}."
            q, k, v = self._qkv(rms_norm(x, self.w[p + "input_layernorm.weight"], self.eps), i, positions)
            x = x + self._linear(attend(q, k, v, i).reshape(x.shape[0], -1), p + "self_attn.o_proj")
            h = rms_norm(x, self.w[p + "post_attention_layernorm.weight"], self.eps)
            gate, up = self._linear(h, p + "mlp.gate_proj"), self._linear(h, p + "mlp.up_proj")
            x = x + self._linear(F.silu(gate) * up, p + "mlp.down_proj")
        return rms_norm(x, self.w["model.norm.weight"], self.eps)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.w["lm_head.weight"]).float()

    @torch.no_grad()
    def prefill(self, prompts: list[list[int]], slots: list[list[int]]) -> torch.Tensor:
        """Run whole prompts, writing their KV into the given slots; (prompts, vocab) logits of each last token."""
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        ids = torch.tensor([t for p in prompts for t in p], device=self.device)
        slot_t = torch.tensor([s for seq in slots for s in seq], device=self.device)
        starts = lengths.cumsum(0) - lengths
        row = torch.repeat_interleave(torch.arange(len(prompts), device=self.device), lengths)
        positions = torch.arange(len(ids), device=self.device) - starts[row]
        longest = max(len(p) for p in prompts)

        def padded(t: torch.Tensor) -> torch.Tensor:
            out = t.new_zeros(len(prompts), longest, *t.shape[1:])
            out[row, positions] = t
            return out.transpose(1, 2)

        # right padding: with a causal mask no real query sees a pad, so one SDPA call runs every prompt
        def attend(q, k, v, layer):
            self.k_cache[layer, slot_t] = k
            self.v_cache[layer, slot_t] = v
            out = F.scaled_dot_product_attention(padded(q), padded(k), padded(v), is_causal=True, enable_gqa=True)
            return out.transpose(1, 2)[row, positions]

        return self._logits(self._forward(ids, positions, attend)[starts + lengths - 1])

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, tables: torch.Tensor,
               lens: torch.Tensor) -> torch.Tensor:
        """One token per sequence: (B,) tokens at (B,) positions, their KV written at (B,) slots; (B, width)
        block tables and (B,) context lengths (this token included). Returns (B, vocab) logits.

        No host synchronization on the kernel path, so the step can be captured in a CUDA graph."""
        def attend(q, k, v, layer):
            return torch.ops.r1kit.paged_decode(q, k, v, slots, tables, lens, self.cache_key, layer)

        return self._logits(self._forward(tokens, positions, attend))
