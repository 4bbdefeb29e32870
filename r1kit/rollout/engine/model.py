"""A plain-PyTorch forward of the Llama family (Llama, Mistral, Qwen2, Qwen3) over a paged KV cache.

It holds the HF model's own parameter tensors, never copies, so optimizer steps on the policy are seen by
the next rollout. Each layer's q/k/v (with their biases) and gate/up are one buffer and one projection each
(a matmul; a few rows through a small weight, `gemv.project`: one pass over the weight, the SwiGLU included):
where the engine shares the policy's tensors, the policy's parameters become views into that buffer (a
second engine on the same policy finds them fused already). When the engine runs in another dtype than
the policy (bf16 rollouts of fp32 master weights), it keeps preallocated buffers of its own, and for a
peft LoRA model one merged buffer (W + scale * B @ A) per adapted layer; `sync_weights()` refreshes them
in place.

Prefill runs layer by layer through `prefill_layer` (one padded SDPA call for all prompts; a chunk of a
prompt whose earlier chunks ran in earlier steps attends to their keys, read back from the cache), decode
through `decode_layer`, which attends through the paged-attention op, so a whole step can be captured
in a CUDA graph. A layer returns its output apart from the residual stream, which the next layer adds in
its input norm (`norm.add_rms_norm`: one kernel where an add and a norm were two, as the post-attention
norm adds the attention's output). `compile_layers()` replaces each by one
compiled layer that serves every layer (the prefill one only when asked: a server's), and compiles the
output head.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from r1kit.rollout.compiled import compiled
from r1kit.rollout.engine.attention import register_cache, rotate
from r1kit.rollout.engine.gemv import project_reference, projects_on, small
from r1kit.rollout.engine.norm import add_rms_norm, rms_norm

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")
# every parameter the forward reads; a model with others (an o_proj or MLP bias) would be run wrong
LAYER_PARAMETERS = frozenset(
    ["input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.o_proj.weight",
     "self_attn.q_norm.weight", "self_attn.k_norm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
     "mlp.down_proj.weight"] + [f"self_attn.{p}_proj.{kind}" for p in "qkv" for kind in ("weight", "bias")])
MODEL_PARAMETERS = frozenset(["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"])


def base_model(model):
    """The language model itself (a peft model's wrapped one)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def unsupported(model) -> str | None:
    """Why the engine cannot run this HF model (its family, its activation, parameters it has no place
    for), or None when it can."""
    inner = base_model(model)
    config = inner.config
    if config.model_type not in SUPPORTED:
        return f"the rollout engine runs {', '.join(SUPPORTED)} models, not {config.model_type!r}"
    if getattr(config, "hidden_act", "silu") not in ("silu", "swish"):
        return f"the rollout engine's MLP is SwiGLU, and this model's activation is {config.hidden_act!r}"
    names = [n.replace(".base_layer", "") for n, _ in inner.named_parameters() if ".lora_" not in n]
    left = [n for n in names if n not in MODEL_PARAMETERS
            and not (n.startswith("model.layers.") and n.split(".", 3)[-1] in LAYER_PARAMETERS)]
    if left:
        return f"the rollout engine has no place for {len(left)} of this model's parameters ({', '.join(left[:3])})"
    return None


def attention_window(config) -> int | None:
    """The sliding-window width where the model's attention uses one (Mistral v0.1, Qwen2 with
    use_sliding_window), else None."""
    window = getattr(config, "sliding_window", None)
    sliding = config.model_type == "mistral" or "sliding_attention" in (getattr(config, "layer_types", None) or ())
    return window if window and sliding else None


class LayerWeights(NamedTuple):
    """One decoder layer's tensors (the engine's views of them); None where the family has none. q/k/v (and
    their biases) and gate/up are also one buffer each (qkv, gate_up), q, k, v, gate and up being views
    into it: one matmul where there were three and two (None where a LoRA mix keeps them apart)."""

    input_norm: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    q_bias: torch.Tensor | None
    k_bias: torch.Tensor | None
    v_bias: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    o: torch.Tensor
    post_norm: torch.Tensor
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    qkv: torch.Tensor | None = None
    qkv_bias: torch.Tensor | None = None
    gate_up: torch.Tensor | None = None


@torch.no_grad()
def shared_buffer(members: list[torch.nn.Parameter]) -> torch.Tensor:
    """The members' rows as one tensor that the parameters themselves are views of: their storage if they
    lie back to back already (an earlier engine fused them), else a new buffer they are moved into."""
    first = members[0].data
    offsets = [first.storage_offset() + sum(p.numel() for p in members[:i]) for i in range(len(members))]
    shape = (sum(p.shape[0] for p in members), *first.shape[1:])
    if all(p.data.is_contiguous() and p.data.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
           and p.data.storage_offset() == offset for p, offset in zip(members, offsets, strict=True)):
        return first.new_empty(0).set_(first.untyped_storage(), first.storage_offset(), shape)
    buffer = torch.cat([p.data for p in members])
    for p, view in zip(members, buffer.split([p.shape[0] for p in members]), strict=True):
        p.data = view  # the policy trains the buffer's rows in place: still shared, never copied again
    return buffer


def layer_weights(w: dict[str, torch.Tensor], fused: dict[str, torch.Tensor], prefix: str) -> LayerWeights:
    """The tensors of the layer whose HF parameter names start with prefix, with its fused buffers."""
    attn, mlp = prefix + "self_attn.", prefix + "mlp."
    return LayerWeights(w[prefix + "input_layernorm.weight"], w[attn + "q_proj.weight"], w[attn + "k_proj.weight"],
                        w[attn + "v_proj.weight"], w.get(attn + "q_proj.bias"), w.get(attn + "k_proj.bias"),
                        w.get(attn + "v_proj.bias"), w.get(attn + "q_norm.weight"), w.get(attn + "k_norm.weight"),
                        w[attn + "o_proj.weight"], w[prefix + "post_attention_layernorm.weight"],
                        w[mlp + "gate_proj.weight"], w[mlp + "up_proj.weight"], w[mlp + "down_proj.weight"],
                        fused.get(prefix + "qkv"), fused.get(prefix + "qkv_bias"), fused.get(prefix + "gate_up"))


class PagedDecoder:
    """The decoder's forward for prefill (prompts, whole or a chunk at a time) and decode (one token per
    sequence)."""

    def __init__(self, model, num_slots: int, block_size: int, dtype: torch.dtype | None = None):
        if (reason := unsupported(model)) is not None:
            raise ValueError(f"{reason}; use backend=hf")
        inner = base_model(model)
        config = inner.config
        self.config, self.rotary = config, inner.model.rotary_emb
        params = {n.replace(".base_layer", ""): p for n, p in inner.named_parameters() if ".lora_" not in n}
        params.setdefault("lm_head.weight", params["model.embed_tokens.weight"])
        self.dtype = dtype or params["model.embed_tokens.weight"].dtype
        self.device = params["model.embed_tokens.weight"].device
        # LoRA layers: one buffer holding W + scale * B @ A, recomputed by sync_weights()
        self._merged = [(name, module) for name, module in inner.named_modules()
                        if hasattr(module, "base_layer") and hasattr(module, "lora_A")]
        merged = {name + ".weight" for name, _ in self._merged}
        owned = {name for name, p in params.items() if p.dtype != self.dtype or name in merged}
        self.fused, views = self._fuse(params, owned, config.num_hidden_layers)
        self.w: dict[str, torch.Tensor] = {}
        self._shadowed: list[tuple[torch.Tensor, torch.Tensor]] = []
        for name, p in params.items():
            if name not in owned:
                self.w[name] = p.data  # the policy's own storage
            else:
                self.w[name] = views[name] if name in views else torch.empty_like(p.data, dtype=self.dtype)
                if name not in merged:
                    self._shadowed.append((p.data, self.w[name]))
        self.sync_weights()
        self.layers = config.num_hidden_layers
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        self.gemv = projects_on(self.device, self.dtype)  # a few rows' projections through the Triton kernel
        self.layer_weights = [layer_weights(self.w, self.fused, f"model.layers.{i}.") for i in range(self.layers)]
        self.decode_layer, self.prefill_layer, self.head = self._decode_layer, self._prefill_layer, self._head
        # one block past the others, whose first slot is where padded rows of a captured decode step write
        # their KV (a whole block, so that a table row of it addresses only slots that exist)
        self.block_size, self.scratch_slot = block_size, num_slots
        shape = (self.layers, num_slots + block_size, self.kv_heads, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.cache_key = register_cache(self)
        # no sliding window in the kernels: a context no longer than the window is the same computation
        self.window = attention_window(config)
        self.max_len = min(num_slots, config.max_position_embeddings, self.window or num_slots)
        # rotary tables for every position a sequence can reach, indexed instead of recomputed each step
        position_ids = torch.arange(self.max_len, device=self.device)[None]
        cos, sin = self.rotary(torch.zeros((), dtype=torch.float32, device=self.device), position_ids)
        self.cos, self.sin = cos[0].to(self.dtype), sin[0].to(self.dtype)

    def _fuse(self, params: dict, owned: set[str], layers: int) -> tuple[dict[str, torch.Tensor], dict]:
        """One buffer for each layer's q/k/v (and their biases, where the family has them) and gate/up;
        ({buffer name: buffer}, {member: its view}). A group fuses when the engine owns all its members or
        shares all of them; a mix (LoRA on some projections only) stays apart."""
        fused, views = {}, {}
        for i in range(layers):
            prefix = f"model.layers.{i}."
            attn, mlp = prefix + "self_attn.", prefix + "mlp."
            biases = [attn + f"{p}_proj.bias" for p in "qkv"]
            groups = {prefix + "qkv": [attn + f"{p}_proj.weight" for p in "qkv"],
                      prefix + "gate_up": [mlp + "gate_proj.weight", mlp + "up_proj.weight"]}
            if all(n in params for n in biases):
                groups[prefix + "qkv_bias"] = biases
            for key, names in groups.items():
                mine = [n in owned for n in names]
                if any(mine) and not all(mine):
                    continue
                members = [params[n] for n in names]
                fused[key] = self._owned_buffer(members) if all(mine) else shared_buffer(members)
                views.update(zip(names, fused[key].split([p.shape[0] for p in members]), strict=True))
        return fused, views

    def _owned_buffer(self, members: list[torch.Tensor]) -> torch.Tensor:
        """An empty buffer in the engine's dtype with the members' rows back to back (sync_weights fills it)."""
        rows = sum(p.shape[0] for p in members)
        return torch.empty(rows, *members[0].shape[1:], dtype=self.dtype, device=self.device)

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

    def _pre_attention(self, x: torch.Tensor, residual: torch.Tensor, lw: LayerWeights):
        """A layer up to attention: the previous layer's output x added to the residual stream, input norm,
        q/k/v projections, q/k norms (Qwen3); (q, k, v, stream), q and k not yet rotated."""
        stream, h = add_rms_norm(x, residual, lw.input_norm, self.eps)
        if lw.qkv is not None:
            q, k, v = self._project(h, lw.qkv, lw.qkv_bias).split([lw.q.shape[0], lw.k.shape[0], lw.v.shape[0]], -1)
        else:
            q, k, v = F.linear(h, lw.q, lw.q_bias), F.linear(h, lw.k, lw.k_bias), F.linear(h, lw.v, lw.v_bias)
        q = q.reshape(-1, self.heads, self.head_dim)
        k, v = k.reshape(-1, self.kv_heads, self.head_dim), v.reshape(-1, self.kv_heads, self.head_dim)
        if lw.q_norm is not None:
            q, k = rms_norm(q, lw.q_norm, self.eps), rms_norm(k, lw.k_norm, self.eps)
        return q, k, v, stream

    def _post_attention(self, stream: torch.Tensor, attention: torch.Tensor, lw: LayerWeights
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """A layer after attention: output projection, residual, post norm, SwiGLU MLP; (the MLP's output,
        the stream it is to be added to)."""
        stream, h = add_rms_norm(self._project(attention.reshape(stream.shape[0], -1), lw.o), stream,
                                 lw.post_norm, self.eps)
        if lw.gate_up is not None:
            activation = self._project(h, lw.gate_up, pair=True)
        else:
            activation = F.silu(F.linear(h, lw.gate)) * F.linear(h, lw.up)
        return self._project(activation, lw.down), stream

    def _project(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, pair: bool = False
                 ) -> torch.Tensor:
        """x @ w.T (+ bias); with `pair`, silu(gate) * up of w = [gate; up]. A few rows (a small decode batch)
        through a small weight go through the Triton kernel, one pass over the weight; the rest through a
        matmul, the activation compiled into one kernel with the layer's other pointwise work."""
        if self.gemv and small(x.shape[0], w):
            return torch.ops.r1kit.project(x, w, bias, pair)
        return project_reference(x, w, bias, pair)

    def _decode_layer(self, x: torch.Tensor, residual: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      lw: LayerWeights, slots: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor, layer: int,
                      prefill: bool) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v, stream = self._pre_attention(x, residual, lw)
        attention = torch.ops.r1kit.paged_decode(q, k, v, cos, sin, slots, tables, lens, self.cache_key, layer,
                                                 prefill)
        return self._post_attention(stream, attention, lw)

    def compile_layers(self, prefill: bool = False) -> None:
        """Decode (and prefill) through one compiled layer each, reused by all (one compilation of one layer,
        not of the whole stack: seconds instead of a minute, with the same fusions). Uncompiled, a prefill
        is ~30 ops a layer launched from Python: ~30 ms for a few short prompts, which a server pays at
        every arrival; compiled, ~20 ms, for ~20 s of compiling (two variants) that a run which prefills a
        few times does not get back. The output head compiles too: its norm and the logits' conversion to
        fp32 into the caller's buffer, a few fused kernels where eager ran ten."""
        self.decode_layer = compiled(self._decode_layer, "the engine's decode layer")
        self.head = compiled(self._head, "the engine's output head")
        if prefill:
            self.prefill_layer = compiled(self._prefill_layer, "the engine's prefill layer")

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.w["model.embed_tokens.weight"])

    def _rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[positions], self.sin[positions]

    def _head(self, x: torch.Tensor, residual: torch.Tensor, norm: torch.Tensor, lm_head: torch.Tensor,
              out: torch.Tensor) -> None:
        """fp32 next-token logits of the last layer's output x added to its stream, written into out."""
        out.copy_(F.linear(add_rms_norm(x, residual, norm, self.eps)[1], lm_head))

    def _logits(self, x: torch.Tensor, residual: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        lm_head = self.w["lm_head.weight"]
        out = x.new_empty(x.shape[0], lm_head.shape[0], dtype=torch.float32) if out is None else out
        self.head(x, residual, self.w["model.norm.weight"], lm_head, out)
        return out

    @torch.no_grad()
    def prefill(self, tokens: list[list[int]], slots: list[list[int]]) -> torch.Tensor:
        """Run prompt chunks: row i's tokens are the last of its prompt's positions whose KV slots are slots[i]
        (from position 0: the earlier ones' KV is in the cache already). Writes the chunks' KV; returns
        (rows, vocab) logits of each row's last token."""
        lengths = torch.tensor([len(t) for t in tokens], device=self.device)
        firsts = [len(s) - len(t) for s, t in zip(slots, tokens, strict=True)]
        ids = torch.tensor([t for chunk in tokens for t in chunk], device=self.device)
        slot_t = torch.tensor([s for seq, first in zip(slots, firsts, strict=True) for s in seq[first:]],
                              device=self.device)
        starts = lengths.cumsum(0) - lengths
        row = torch.repeat_interleave(torch.arange(len(tokens), device=self.device), lengths)
        offsets = torch.arange(len(ids), device=self.device) - starts[row]  # each token's place in its chunk
        grid = torch.empty(len(tokens), max(len(t) for t in tokens), 0, device=self.device)  # only its shape
        first_t = torch.tensor(firsts, device=self.device)
        x, (cos, sin) = self._embed(ids), self._rotary(first_t[row] + offsets)
        context, mask = self._context(slots, first_t, grid.shape[1]) if any(firsts) else (None, None)
        residual = torch.zeros_like(x)
        for layer, lw in enumerate(self.layer_weights):
            x, residual = self.prefill_layer(x, residual, cos, sin, lw, self.k_cache[layer], self.v_cache[layer],
                                             slot_t, row, offsets, grid, context, mask)
        last = starts + lengths - 1
        return self._logits(x[last], residual[last], None)

    def _context(self, slots: list[list[int]], firsts: torch.Tensor, width: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, longest) slots of every row's positions from 0, right-padded with the scratch slot, and the
        (rows, 1, width, longest) mask where a chunk's query at position p sees the keys at positions <= p."""
        longest = max(len(s) for s in slots)
        context = torch.tensor([s + [self.scratch_slot] * (longest - len(s)) for s in slots], device=self.device)
        queries = firsts[:, None] + torch.arange(width, device=self.device)
        return context, (torch.arange(longest, device=self.device) <= queries[..., None])[:, None]

    def _prefill_layer(self, x: torch.Tensor, residual: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       lw: LayerWeights, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                       row: torch.Tensor, offsets: torch.Tensor, grid: torch.Tensor, context: torch.Tensor | None,
                       mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """A layer over the chunks' packed tokens (token i is chunk row[i]'s offsets[i]), writing each token's KV
        at its slot of the layer's caches; grid is (chunks, longest, 0). Chunks that continue a prompt (context
        given) attend to all its keys so far, read back from the cache. The caches are passed, not indexed by
        layer here: a compiled layer would specialize on the index, once per layer."""
        q, k, v, stream = self._pre_attention(x, residual, lw)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        k_cache[slots] = k
        v_cache[slots] = v

        def padded(t: torch.Tensor) -> torch.Tensor:
            out = t.new_zeros(grid.shape[0], grid.shape[1], *t.shape[1:])
            out[row, offsets] = t
            return out.transpose(1, 2)

        if context is None:
            # right padding: with a causal mask no real query sees a pad, so one SDPA call runs every prompt
            attention = F.scaled_dot_product_attention(padded(q), padded(k), padded(v), is_causal=True,
                                                       enable_gqa=True)
        else:
            # keys repeated per query head, not enable_gqa: with a mask, that runs only SDPA's math kernel on CUDA
            group = self.heads // self.kv_heads
            keys, values = (cache[context].repeat_interleave(group, 2).transpose(1, 2) for cache in (k_cache, v_cache))
            attention = F.scaled_dot_product_attention(padded(q), keys, values, attn_mask=mask)
        return self._post_attention(stream, attention.transpose(1, 2)[row, offsets], lw)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, tables: torch.Tensor,
               lens: torch.Tensor, out: torch.Tensor | None = None, last: torch.Tensor | None = None) -> torch.Tensor:
        """One token per row: (B,) tokens at (B,) positions, their KV written at (B,) slots; (B, width) block
        tables and (B,) context lengths (this token included). Returns (B, vocab) fp32 logits, in out when
        given. With `last`, the rows are prompt tokens (a row attends to the rows before it in its prompt),
        and the logits are those of the rows `last` indexes.

        No host synchronization on the kernel path, so the step can be captured in a CUDA graph."""
        x, (cos, sin) = self._embed(tokens), self._rotary(positions)
        residual = torch.zeros_like(x)
        prefill = last is not None
        for layer, lw in enumerate(self.layer_weights):
            x, residual = self.decode_layer(x, residual, cos, sin, lw, slots, tables, lens, layer, prefill)
        return self._logits(x[last], residual[last], out) if prefill else self._logits(x, residual, out)
