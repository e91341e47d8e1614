"""MusicGen's decoder step for generation with a static key/value cache, optionally replayed as a
CUDA graph.

Why: transformers' decoder call per generated frame spends its time in Python on a GPU (cache
objects that grow by concatenation, mask building, many small kernel launches per layer), which
capped generation far below what the weights' memory traffic allows (measured in BENCHMARKS.md with
bench/bench_generate.py). Here every layer's self-attention keys/values go into buffers allocated
once per window, the cross-attention keys/values of the text are computed once, and a step has fixed
shapes — so on CUDA the whole decoder step (all layers and LM heads) is captured once as a CUDA
graph and replayed per frame (one launch).

The maths is transformers' own: the same modules are called (embeddings, layer norms, q/k/v/out
projections — peft LoRA layers included, merged or not — fc1/fc2, LM heads), the encoder states are
projected and masked as ``MusicgenForConditionalGeneration.forward`` does, the encoder attention
mask comes from transformers' ``create_bidirectional_mask``, and attention runs through the
attention function transformers' MusicGen uses for the model's ``attn_implementation``. Logits equal
transformers' forward (tested in fp32 on the tiny model).

    dec = StaticDecoder(base, hidden, mask, rows=B, max_len=L, cuda_graph=True)
    logits = dec.prefill(ids)          # ids (B*K, n) from position 0 -> logits (B*K, V) of the last position
    logits = dec.step(col, pos)        # col (B*K,) ids at position pos -> logits (B*K, V)
"""

from __future__ import annotations


class StaticDecoder:
    # positions before the tokens (PrefixStaticDecoder: the melody model's condition)
    prefix_len = 0

    def __init__(self, base, hidden, mask, rows: int, max_len: int, cuda_graph: bool = False):
        """base: MusicgenForConditionalGeneration (eval mode); hidden (rows, L, Dt) text-encoder
        states (with the null half already appended for guidance); mask (rows, L) or None; max_len:
        positions this window will use (prefix + generated)."""
        import torch
        from transformers.masking_utils import create_bidirectional_mask

        cfg = self._common(base.decoder, rows, max_len)
        with torch.no_grad():
            enc = hidden  # projected and masked as MusicgenForConditionalGeneration.forward does
            if (base.text_encoder.config.hidden_size != cfg.hidden_size
                    and cfg.cross_attention_hidden_size is None):
                enc = base.enc_to_dec_proj(enc)
            if mask is not None:
                enc = enc * mask[..., None]
            dummy = torch.zeros((self.rows, 1, cfg.hidden_size), dtype=enc.dtype, device=self.device)
            self.enc_mask = create_bidirectional_mask(config=cfg, inputs_embeds=dummy,
                                                      attention_mask=mask,
                                                      encoder_hidden_states=enc)
            self.cross_kv = []
            for layer in self.layers:
                ca = layer.encoder_attn
                shape = (*enc.shape[:-1], -1, ca.head_dim)
                self.cross_kv.append((ca.k_proj(enc).view(shape).transpose(1, 2),
                                      ca.v_proj(enc).view(shape).transpose(1, 2)))
        self._graph(cuda_graph)

    def _common(self, causal_lm, rows: int, max_len: int):
        """The decoder's modules, the attention function and the self-attention key/value buffers of
        ``max_len`` positions; returns the decoder config."""
        import torch
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        from transformers.models.musicgen import modeling_musicgen as mm

        self.decoder = causal_lm.model.decoder
        self.heads = causal_lm.lm_heads
        cfg = causal_lm.config
        self.K = int(cfg.num_codebooks)
        self.rows = int(rows)
        self.max_len = int(max_len)
        p = next(self.decoder.parameters())
        self.device, self.dtype = p.device, self.decoder.embed_positions.weights.dtype
        if self.max_len > self.decoder.embed_positions.weights.shape[0]:
            raise ValueError(f"max_len {self.max_len} exceeds the decoder's "
                             f"{self.decoder.embed_positions.weights.shape[0]} positions")
        self.attn_impl = cfg._attn_implementation
        self.attn = ALL_ATTENTION_FUNCTIONS.get_interface(self.attn_impl, mm.eager_attention_forward)
        self.layers = list(self.decoder.layers)
        self.k_buf, self.v_buf = [], []
        for layer in self.layers:
            sa = layer.self_attn
            buf = (self.rows, sa.num_heads, self.max_len, sa.head_dim)
            self.k_buf.append(torch.zeros(buf, dtype=self.dtype, device=self.device))
            self.v_buf.append(torch.zeros(buf, dtype=self.dtype, device=self.device))
        return cfg

    def _graph(self, cuda_graph: bool) -> None:
        self.graph = None
        if cuda_graph:
            if self.device.type != "cuda":
                raise ValueError("cuda_graph needs the decoder on a CUDA device")
            self._capture()

    # ------------------------------------------------------------------------------------------
    def _attend(self, module, q, k, v, mask):
        out, _ = self.attn(module, q, k, v, mask, dropout=0.0, scaling=module.scaling)
        return out

    def _forward(self, ids, pos0, n_valid, self_mask, prefix=None):
        """ids (rows*K, S) at positions pos0 .. pos0+S-1 (pos0: int or 1-element LongTensor), after
        ``prefix`` (rows, P, H) embeddings when given (then positions run from pos0 - P); attention
        over buffer positions [0, n_valid) (n_valid: int, or None = the whole buffer with
        ``self_mask``). Returns the last position's logits (rows*K, V)."""
        import torch

        dec = self.decoder
        x = ids.reshape(-1, self.K, ids.shape[-1])
        emb = sum(dec.embed_tokens[k](x[:, k]) for k in range(self.K))
        if prefix is not None:
            emb = torch.cat([prefix.to(emb.dtype), emb], dim=1)
            pos0 = pos0 - prefix.shape[1]
        S = emb.shape[1]
        if isinstance(pos0, int):
            positions = torch.arange(pos0, pos0 + S, device=self.device)
        else:
            positions = pos0 + torch.arange(S, device=self.device)
        h = emb + dec.embed_positions.weights.index_select(0, positions)
        for i, layer in enumerate(self.layers):
            sa = layer.self_attn
            res = h
            y = layer.self_attn_layer_norm(h)
            shape = (*y.shape[:-1], -1, sa.head_dim)
            q = sa.q_proj(y).view(shape).transpose(1, 2)
            k = sa.k_proj(y).view(shape).transpose(1, 2)
            v = sa.v_proj(y).view(shape).transpose(1, 2)
            self.k_buf[i].index_copy_(2, positions, k.to(self.dtype))
            self.v_buf[i].index_copy_(2, positions, v.to(self.dtype))
            if n_valid is None:
                kk, vv = self.k_buf[i], self.v_buf[i]
            else:
                kk, vv = self.k_buf[i][:, :, :n_valid], self.v_buf[i][:, :, :n_valid]
            a = self._attend(sa, q, kk, vv, self_mask)
            h = res + sa.out_proj(a.reshape(*y.shape[:-1], -1).contiguous())

            h = self._cross(layer, i, h)

            res = h
            y = layer.final_layer_norm(h)
            h = res + layer.fc2(layer.activation_fn(layer.fc1(y)))
        h = dec.layer_norm(h[:, -1:])
        logits = torch.stack([head(h) for head in self.heads], dim=1)  # (rows, K, 1, V)
        return logits.reshape(-1, logits.shape[-1])

    def _cross(self, layer, i: int, h):
        """The layer's cross-attention block over the text states."""
        ca = layer.encoder_attn
        res = h
        y = layer.encoder_attn_layer_norm(h)
        q = ca.q_proj(y).view(*y.shape[:-1], -1, ca.head_dim).transpose(1, 2)
        ck, cv = self.cross_kv[i]
        a = self._attend(ca, q, ck, cv, self.enc_mask)
        return res + ca.out_proj(a.reshape(*y.shape[:-1], -1).contiguous())

    # ------------------------------------------------------------------------------------------
    def prefill(self, ids):
        """Run ids (rows*K, S) at positions 0 .. S-1 (causal); returns the last position's
        logits."""
        import torch

        P = self.prefix_len
        S = P + ids.shape[-1]
        # S == 1, or sdpa: transformers' sdpa runs causal when there is no mask and S > 1
        mask = None
        if S > 1 and self.attn_impl != "sdpa":
            i = torch.arange(S, device=self.device)
            mask = torch.where(i[None, :] <= i[:, None], 0.0, torch.finfo(self.dtype).min).to(self.dtype)
            mask = mask.view(1, 1, S, S)
        with torch.no_grad():
            return self._forward(ids, P, S, mask, prefix=self.prefix if P else None)

    def step(self, col, pos: int):
        """col (rows*K,) ids at position ``pos``; returns logits (rows*K, V) (on CUDA graphs: a view
        of the graph's output buffer, valid until the next step)."""
        import torch

        pos = pos + self.prefix_len  # (token positions come after the prefix)
        if self.graph is not None:
            self._ids.copy_(col.view(-1, 1))
            self._pos.fill_(pos)
            self.graph.replay()
            return self._out
        with torch.no_grad():
            return self._forward(col.view(-1, 1), pos, pos + 1, None)

    def _graph_step(self):
        import torch

        valid = torch.arange(self.max_len, device=self.device) <= self._pos  # (max_len,)
        mask = torch.where(valid, 0.0, torch.finfo(self.dtype).min).to(self.dtype).view(1, 1, 1, -1)
        return self._forward(self._ids, self._pos, None, mask)

    def _capture(self):
        import torch

        self._ids = torch.zeros((self.rows * self.K, 1), dtype=torch.long, device=self.device)
        # Warm-up and capture write garbage K/V at this position; every position is written by its
        # own step (or the prefill) before any query attends to it, so that is harmless.
        self._pos = torch.full((1,), self.max_len - 1, dtype=torch.long, device=self.device)
        with torch.no_grad():
            side = torch.cuda.Stream(device=self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._graph_step()
            torch.cuda.current_stream(self.device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self._out = self._graph_step()


class PrefixStaticDecoder(StaticDecoder):
    """The static-cache step for a decoder conditioned by a prefix instead of cross-attention
    (MusicGen-Melody): ``prefix`` (rows, P, H) embeddings (built by the family,
    lora.modeling.musicgen_melody.prefix) take positions 0 .. P-1 ahead of the tokens, as
    transformers' MusicgenMelodyDecoder concatenates them; its layers have no cross-attention.
    ``max_len`` counts token positions (the prefix's come on top)."""

    def __init__(self, causal_lm, prefix, rows: int, max_len: int, cuda_graph: bool = False):
        self.prefix = prefix
        self.prefix_len = int(prefix.shape[1])
        self._common(causal_lm, rows, self.prefix_len + max_len)
        self._graph(cuda_graph)

    def _cross(self, layer, i: int, h):
        return h
