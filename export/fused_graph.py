"""The ``fused`` exporter: build the ONNX graphs straight from the weights with onnxruntime's fused operators.

``torch.onnx`` traces the model op by op: 770-860 nodes (336 after onnxruntime's optimiser), most of them
shape arithmetic, reshapes and transposes around the matrix products. This builder writes the same network in
~100 nodes with ``com.microsoft`` operators that onnxruntime implements as single kernels (10-20 % faster at
batch 1, on par at batch 256; measurement in docs/predictor.md):

* ``Attention`` (fused QKV projection, causal mask, softmax, KV cache in/out) per layer,
* ``BiasGelu`` (bias + exact GELU) in the FFNs and the embedding/head blocks,
* everything that depends only on the fixed system (channel masks, padded channels, normalisation, the
  sinusoidal positions) folded into weights and biases at export time.

The window graph has the same inputs, outputs, shapes and metadata as the traced (``torchscript``) one
(docs/predictor.md); the step graph keeps its KV cache in place (the ``buffer`` layout). Parity with torch is
checked by the tests and by :func:`export.onnx_export.export_loaded` on every export. The graphs need
onnxruntime (the contrib operators are not part of the ONNX standard), which is the predictor's runtime.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

MS = "com.microsoft"
LN_EPS = 1e-5  # torch.nn.LayerNorm default, used by the model


class _Builder:
    """Accumulates nodes and initialisers with unique names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0
        self._consts: dict[str, np.ndarray] = {}

    def const(self, name: str, arr: Any, dtype: Any = np.float32) -> str:
        """An initialiser (created once per name; a second use must pass the same value)."""
        a = np.array(arr, dtype=dtype, order="C")  # keeps 0-d scalars 0-d
        if name in self._consts:
            if not np.array_equal(self._consts[name], a):
                raise ValueError(f"fused graph: constant {name!r} defined twice with different values")
            return name
        self._consts[name] = a
        self.inits.append(numpy_helper.from_array(a, name))
        return name

    def op(
        self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", **attrs: Any
    ) -> list[str]:
        self._n += 1
        outs = [f"{op_type.lower()}_{self._n}_{i}" for i in range(n_out)]
        self.nodes.append(
            helper.make_node(op_type, inputs, outs, name=f"{op_type}_{self._n}", domain=domain, **attrs)
        )
        return outs

    def op1(self, op_type: str, inputs: list[str], domain: str = "", **attrs: Any) -> str:
        return self.op(op_type, inputs, 1, domain, **attrs)[0]


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).cpu().numpy()


class _Weights:
    """The checkpoint's tensors, reduced to the exported system (n states, m inputs)."""

    def __init__(self, system: torch.nn.Module) -> None:
        from fm_core.model import sinusoidal_positions

        core = system.core
        c = core.cfg
        self.cfg = c
        n, m = system.n, system.m
        self.n, self.m = n, m
        self.x_mean, self.x_std = _np(core.x_mean[:n]), _np(core.x_std[:n])
        self.u_mean, self.u_std = _np(core.u_mean[:m]), _np(core.u_std[:m])
        f_full = c.n_max + c.m_max + 1
        # columns of one step's features [x (n), u (m), obs] inside the model's padded step features
        step_cols = list(range(n)) + [c.n_max + j for j in range(m)] + [c.n_max + c.m_max]
        tok_cols = [i * f_full + j for i in range(c.patch) for j in step_cols]
        masks = np.concatenate([np.arange(c.n_max) < n, np.arange(c.m_max) < m]).astype(np.float64)
        mask_cols = slice(c.patch * f_full, c.patch * f_full + c.n_max + c.m_max)
        emb = core.embed
        w1, wskip = _np(emb.fc1.weight).T, _np(emb.skip.weight).T  # (token_features, ·)
        self.emb_w1 = w1[tok_cols]
        self.emb_b1 = _np(emb.fc1.bias) + masks @ w1[mask_cols]
        self.emb_wskip = wskip[tok_cols]
        self.emb_w2 = _np(emb.fc2.weight).T
        pos = _np(sinusoidal_positions(torch.arange(c.max_len), c.d_model))
        # all input-independent terms of the embedding: fc2/skip biases, masks, positions
        self.emb_const = pos + _np(emb.fc2.bias) + _np(emb.skip.bias) + masks @ wskip[mask_cols]
        self.layers = []
        for blk in core.blocks:
            a = blk.attn
            self.layers.append(
                {
                    "ln1_g": _np(blk.ln1.weight),
                    "ln1_b": _np(blk.ln1.bias),
                    "w_qkv": np.concatenate(
                        [_np(a.q.weight).T, _np(a.k.weight).T, _np(a.v.weight).T], axis=1
                    ),
                    "b_qkv": np.concatenate([_np(a.q.bias), _np(a.k.bias), _np(a.v.bias)]),
                    "w_o": _np(a.out.weight).T,
                    "b_o": _np(a.out.bias),
                    "ln2_g": _np(blk.ln2.weight),
                    "ln2_b": _np(blk.ln2.bias),
                    "w_f1": _np(blk.ff[0].weight).T,
                    "b_f1": _np(blk.ff[0].bias),
                    "w_f2": _np(blk.ff[2].weight).T,
                    "b_f2": _np(blk.ff[2].bias),
                }
            )
        self.lnf_g, self.lnf_b = _np(core.ln_f.weight), _np(core.ln_f.bias)
        head = core.head
        # pred = (dx_scale * head(z)[:n] + x_norm_obs) * x_std + x_mean, with dx_scale * x_std folded into the
        # head's output weights
        xs = self.x_std * _np(core.dx_scale[:n])
        self.head_w1, self.head_b1 = _np(head.fc1.weight).T, _np(head.fc1.bias)
        self.head_w2 = _np(head.fc2.weight).T[:, :n] * xs
        self.head_wskip = _np(head.skip.weight).T[:, :n] * xs
        self.head_b = (_np(head.fc2.bias)[:n] + _np(head.skip.bias)[:n]) * xs + self.x_mean


def _features(b: _Builder, w: _Weights, x: str, u: str, obs: str) -> tuple[str, str]:
    """Step features [x_norm (hidden -> 0), u_norm, obs] (·,·,n+m+1) and the hidden-zeroed x - x_mean."""
    obs3 = b.op1("Unsqueeze", [obs, b.const("axis_last", [-1], np.int64)])
    seen = b.op1("Greater", [obs3, b.const("half", 0.5)])
    xc = b.op1("Sub", [x, b.const("x_mean", w.x_mean)])
    xc = b.op1("Where", [seen, xc, b.const("zero", 0.0)])  # hidden states may hold NaN: select, not multiply
    xn = b.op1("Mul", [xc, b.const("x_inv_std", 1.0 / w.x_std)])
    un = b.op1("Mul", [b.op1("Sub", [u, b.const("u_mean", w.u_mean)]), b.const("u_inv_std", 1.0 / w.u_std)])
    return b.op1("Concat", [xn, un, obs3], axis=-1), xc


def _embed_tail(b: _Builder, w: _Weights, tok: str, pos_const: str) -> tuple[str, str]:
    """Residual-block embedding of the tokens plus positions; returns (LN1 of layer 0, residual stream)."""
    g = b.op1(
        "BiasGelu",
        [b.op1("MatMul", [tok, b.const("emb_w1", w.emb_w1)]), b.const("emb_b1", w.emb_b1)],
        domain=MS,
    )
    main = b.op1("MatMul", [g, b.const("emb_w2", w.emb_w2)])
    skip = b.op1("Add", [b.op1("MatMul", [tok, b.const("emb_wskip", w.emb_wskip)]), pos_const])
    lay = w.layers[0]
    return _add_norm(b, main, skip, b.const("l0_ln1_g", lay["ln1_g"]), b.const("l0_ln1_b", lay["ln1_b"]))


def _add_norm(b: _Builder, a: str, h: str, gamma: str, beta: str, bias: str | None = None) -> tuple[str, str]:
    """Residual add then LayerNorm: returns (LN(a + bias + h), a + bias + h).

    Plain Add + LayerNormalization: the contrib SkipLayerNormalization measured 20 % slower on the CPU
    provider at batch 256 (and not faster at batch 1).
    """
    if bias:
        a = b.op1("Add", [a, bias])
    s = b.op1("Add", [a, h])
    return b.op1("LayerNormalization", [s, gamma, beta], axis=-1, epsilon=LN_EPS), s


def _blocks(b: _Builder, w: _Weights, ln: str, h: str) -> tuple[str, list[str]]:
    """The decoder blocks of a window; returns (LN_f of the last residual stream, per-layer present
    (2,B,H,T,dh))."""
    c = w.cfg
    presents = []
    for i, lay in enumerate(w.layers):
        ins = [ln, b.const(f"l{i}_w_qkv", lay["w_qkv"]), b.const(f"l{i}_b_qkv", lay["b_qkv"])]
        att, present = b.op("Attention", ins, 2, MS, num_heads=c.n_heads, unidirectional=1)
        presents.append(present)
        h, ln = _block_tail(b, w, i, att, h)
    return ln, presents


def _block_tail(b: _Builder, w: _Weights, i: int, att: str, h: str) -> tuple[str, str]:
    """Layer ``i`` after attention: output projection, residual, LN2, FFN, residual, next LN (or LN_f)."""
    lay = w.layers[i]
    proj = b.op1("MatMul", [att, b.const(f"l{i}_w_o", lay["w_o"])])
    ln2, h = _add_norm(
        b,
        proj,
        h,
        b.const(f"l{i}_ln2_g", lay["ln2_g"]),
        b.const(f"l{i}_ln2_b", lay["ln2_b"]),
        b.const(f"l{i}_b_o", lay["b_o"]),
    )
    f1 = b.op1("MatMul", [ln2, b.const(f"l{i}_w_f1", lay["w_f1"])])
    g = b.op1("BiasGelu", [f1, b.const(f"l{i}_b_f1", lay["b_f1"])], domain=MS)
    f2 = b.op1("MatMul", [g, b.const(f"l{i}_w_f2", lay["w_f2"])])
    if i + 1 < len(w.layers):
        nxt = w.layers[i + 1]
        gamma, beta = b.const(f"l{i + 1}_ln1_g", nxt["ln1_g"]), b.const(f"l{i + 1}_ln1_b", nxt["ln1_b"])
    else:
        gamma, beta = b.const("lnf_g", w.lnf_g), b.const("lnf_b", w.lnf_b)
    ln, h = _add_norm(b, f2, h, gamma, beta, b.const(f"l{i}_b_f2", lay["b_f2"]))
    return h, ln


def _head(b: _Builder, w: _Weights, z: str, xc_t: str) -> str:
    """Raw-unit prediction: head(z) * x_std + x_mean + (x - x_mean at observed steps)."""
    g = b.op1(
        "BiasGelu",
        [b.op1("MatMul", [z, b.const("head_w1", w.head_w1)]), b.const("head_b1", w.head_b1)],
        domain=MS,
    )
    main = b.op1("MatMul", [g, b.const("head_w2", w.head_w2)])
    skip = b.op1("MatMul", [z, b.const("head_wskip", w.head_wskip)])
    return b.op1("Add", [b.op1("Add", [main, skip]), b.op1("Add", [xc_t, b.const("head_b", w.head_b)])])


def _split_presents(b: _Builder, presents: list[str]) -> None:
    """Per-layer (2,B,H,S,dh) -> outputs present_k, present_v (L,B,H,S,dh)."""
    ax1 = b.const("axis_1", [1], np.int64)
    stacked = b.op1("Concat", [b.op1("Unsqueeze", [p, ax1]) for p in presents], axis=1)  # (2,L,B,H,S,dh)
    for idx, name in ((0, "present_k"), (1, "present_v")):
        b.nodes.append(
            helper.make_node(
                "Gather",
                [stacked, b.const(f"idx_{idx}", idx, np.int64)],
                [name],
                name=f"Gather_{name}",
                axis=0,
            )
        )


def _model(
    b: _Builder, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto], name: str
) -> onnx.ModelProto:
    graph = helper.make_graph(b.nodes, name, inputs, outputs, b.inits)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)],
        producer_name="rigfm-fused",
    )
    model.ir_version = 8
    return model


def _cache_shape(c: Any, b: str, s: str) -> list[Any]:
    return [c.n_layers, b, c.n_heads, s, c.d_model // c.n_heads]


def build_full(system: torch.nn.Module) -> onnx.ModelProto:
    """Full-window graph: x (B,T,n), u (B,T,m), obs (B,T) -> pred (B,T,n), present_k/v (L,B,H,T,dh)."""
    w = _Weights(system)
    c, n, m, p = w.cfg, w.n, w.m, w.cfg.patch
    b = _Builder()
    feat, xc = _features(b, w, "x", "u", "obs")
    # sliding patch tokens: [feat[t-p+1], ..., feat[t]] with zeros before the start
    fp = b.op1("Pad", [feat, b.const("pad_front", [0, p - 1, 0, 0, 0, 0], np.int64)])
    t = b.op1("Shape", [feat], start=1, end=2)
    parts = []
    for i in range(p):
        start = b.const(f"tok_start_{i}", [i], np.int64)
        parts.append(b.op1("Slice", [fp, start, b.op1("Add", [t, start]), b.const("axis_t", [1], np.int64)]))
    tok = b.op1("Concat", parts, axis=-1) if p > 1 else parts[0]
    zero = b.const("zero_i64", [0], np.int64)
    pos = b.op1("Slice", [b.const("emb_const", w.emb_const), zero, t, zero])  # (T,d)
    ln, h = _embed_tail(b, w, tok, pos)
    z, presents = _blocks(b, w, ln, h)
    b.nodes.append(helper.make_node("Identity", [_head(b, w, z, xc)], ["pred"], name="Identity_pred"))
    _split_presents(b, presents)
    f = TensorProto.FLOAT
    ins = [
        helper.make_tensor_value_info("x", f, ["B", "T", n]),
        helper.make_tensor_value_info("u", f, ["B", "T", m]),
        helper.make_tensor_value_info("obs", f, ["B", "T"]),
    ]
    outs = [
        helper.make_tensor_value_info("pred", f, ["B", "T", n]),
        helper.make_tensor_value_info("present_k", f, _cache_shape(c, "B", "T")),
        helper.make_tensor_value_info("present_v", f, _cache_shape(c, "B", "T")),
    ]
    return _model(b, ins, outs, "rigfm_full")


def _step_pred(b: _Builder, w: _Weights, z: str, xc: str) -> None:
    """The step graph's ``pred`` output (B,n): the head at the window's last (current) step."""
    p = w.cfg.patch
    xc_t = b.op1(
        "Slice",
        [
            xc,
            b.const("last_start", [p - 1], np.int64),
            b.const("last_end", [p], np.int64),
            b.const("axis_t", [1], np.int64),
        ],
    )
    pred = _head(b, w, z, xc_t)
    b.nodes.append(helper.make_node("Squeeze", [pred, "axis_t"], ["pred"], name="Squeeze_pred"))


def build_step(system: torch.nn.Module) -> onnx.ModelProto:
    """The ``buffer`` step graph: the KV cache lives in fixed-capacity per-layer buffers updated in place.

    Inputs x_win (B,p,n), u_win (B,p,m), obs_win (B,p), past_len (B,) int32 (tokens already in each row's
    cache = the new token's position), past_k_i / past_v_i (B,H,C,dh) for each layer i; outputs pred (B,n)
    and present_k_i / present_v_i (B,H,C,dh). With the present outputs bound to the same buffers as the past
    inputs (onnxruntime IOBinding) the step writes one token per row and copies nothing else; rows have their
    own lengths, so two caches of one stream (live and shadow re-prime) advance in one call. Attention is
    onnxruntime's ``GroupQueryAttention`` (kv_num_heads = num_heads, causal, per-row ``seqlens_k``).
    """
    w = _Weights(system)
    c, n, m, p = w.cfg, w.n, w.m, w.cfg.patch
    b = _Builder()
    feat, xc = _features(b, w, "x_win", "u_win", "obs_win")
    pos = b.op1("Cast", ["past_len"], to=TensorProto.INT64)  # (B,) position of each row's new token
    # window rows before a row's stream start (index pos-p+1+i < 0) are ignored, like the front padding
    idx = b.op1(
        "Add",
        [
            b.op1("Unsqueeze", [pos, b.const("axis_last", [-1], np.int64)]),
            b.const("win_offsets", np.arange(p) - (p - 1), np.int64),
        ],
    )
    valid = b.op1(
        "Cast", [b.op1("GreaterOrEqual", [idx, b.const("zero_i64s", 0, np.int64)])], to=TensorProto.FLOAT
    )
    feat = b.op1("Mul", [feat, b.op1("Unsqueeze", [valid, "axis_last"])])
    tok = b.op1("Reshape", [feat, b.const("tok_shape", [0, 1, -1], np.int64)])  # (B,1,p*(n+m+1))
    pe = b.op1("Gather", [b.const("emb_const", w.emb_const), pos], axis=0)  # (B,d)
    ln, h = _embed_tail(b, w, tok, b.op1("Unsqueeze", [pe, b.const("axis_1", [1], np.int64)]))
    total = b.op1("Add", [b.op1("ReduceMax", ["past_len"], keepdims=0), b.const("one_i32", 1, np.int32)])
    past = [(f"past_k_{i}", f"past_v_{i}", f"present_k_{i}", f"present_v_{i}") for i in range(c.n_layers)]
    z = _blocks_gqa(b, w, ln, h, past, total)
    _step_pred(b, w, z, xc)
    f = TensorProto.FLOAT
    dh = c.d_model // c.n_heads
    ins = [
        helper.make_tensor_value_info("x_win", f, ["B", p, n]),
        helper.make_tensor_value_info("u_win", f, ["B", p, m]),
        helper.make_tensor_value_info("obs_win", f, ["B", p]),
        helper.make_tensor_value_info("past_len", TensorProto.INT32, ["B"]),
    ]
    outs = [helper.make_tensor_value_info("pred", f, ["B", n])]
    for pk, pv, qk, qv in past:
        ins += [helper.make_tensor_value_info(nm, f, ["B", c.n_heads, "C", dh]) for nm in (pk, pv)]
        outs += [helper.make_tensor_value_info(nm, f, ["B", c.n_heads, "C", dh]) for nm in (qk, qv)]
    return _model(b, ins, outs, "rigfm_step")


def _blocks_gqa(
    b: _Builder, w: _Weights, ln: str, h: str, caches: list[tuple[str, str, str, str]], total: str
) -> str:
    """The decoder blocks over in-place KV buffers; returns LN_f of the last residual stream."""
    c = w.cfg
    for i, lay in enumerate(w.layers):
        proj_qkv = b.op1("MatMul", [ln, b.const(f"l{i}_w_qkv", lay["w_qkv"])])
        qkv = b.op1("Add", [proj_qkv, b.const(f"l{i}_b_qkv", lay["b_qkv"])])
        pk, pv, qk, qv = caches[i]
        att = f"att_{i}"
        b.nodes.append(
            helper.make_node(
                "GroupQueryAttention",
                [qkv, "", "", pk, pv, "past_len", total],  # packed QKV; seqlens_k = past length per row
                [att, qk, qv],
                name=f"GroupQueryAttention_{i}",
                domain=MS,
                num_heads=c.n_heads,
                kv_num_heads=c.n_heads,
            )
        )
        h, ln = _block_tail(b, w, i, att, h)
    return ln


def save_fused(system: torch.nn.Module, graph: str, path: str | Path) -> None:
    """Write the fused ``full`` or ``step`` (in-place ``buffer`` KV layout) graph of ``system`` to path."""
    onnx.save(build_full(system) if graph == "full" else build_step(system), str(path))
