"""Padding-free attention for packed rows without flash-attn: `sdpa` run once per packed sample.

flash-attn's varlen kernel attends within each packed sample at a cost of sum(n_i^2). Without it,
sdpa needs a block-causal mask over the whole row, and its kernels cannot skip the masked blocks, so
the cost becomes (sum n_i)^2. This registers `mathctl_varlen`, an attention function for
transformers' `AttentionInterface` that reads the sample boundaries (`cu_seq_lens_q`, the same
keyword flash-attn's varlen path takes) and runs causal sdpa on each sample's slice: no padding,
no mask, sum(n_i^2) work. It is used for training forward/backward only (no KV cache).
"""

from __future__ import annotations

NAME = "mathctl_varlen"
_registered = False


def _varlen_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                 is_causal: bool | None = None, **kwargs):
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None or query.shape[0] != 1:  # not a packed row: plain sdpa
        if attention_mask is not None and attention_mask.dim() == 2:
            # the flash-style mask function gives a [B, T] padding mask; sdpa wants [B, 1, T, T]
            length = query.shape[2]
            causal = torch.ones(length, length, dtype=torch.bool, device=query.device).tril_()
            keys = attention_mask.bool()[:, None, None, -length:]
            diagonal = torch.eye(length, dtype=torch.bool, device=query.device)  # no fully masked row (NaN)
            attention_mask = (causal & keys) | diagonal
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    bounds = bounds.tolist() if hasattr(bounds, "tolist") else list(bounds)
    lengths = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
    groups = query.shape[1] // key.shape[1]
    dropout_p = dropout if module.training else 0.0
    # split (not slicing in a loop): its backward is one concatenation instead of a zero-filled
    # full-size gradient per slice
    pieces = [
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p, scale=scaling,
                                                         enable_gqa=groups > 1)
        for q, k, v in zip(query.split(lengths, dim=2), key.split(lengths, dim=2), value.split(lengths, dim=2))
    ]  # each [1, H, n_i, D]
    out = torch.cat(pieces, dim=2)  # [1, H, T, D]
    return out.transpose(1, 2).contiguous(), None  # [1, T, H, D], as sdpa_attention_forward returns


def register() -> str:
    """Make `mathctl_varlen` known to transformers (idempotent); returns its name."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

        AttentionInterface.register(NAME, _varlen_sdpa)
        ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, flash_attention_mask)  # no mask: boundaries come as kwargs
        _registered = True
    return NAME
