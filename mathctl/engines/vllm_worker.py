"""Code that runs inside vLLM's workers, added to them with `LLM(worker_extension_cls=...)`.

vLLM calls these methods through `collective_rpc("name", ...)`: a method name crosses process
boundaries in every executor (uniprocess, multiprocess, external launcher), a Python function does
not. Weights go through the worker's own `reload_weights` (vLLM's in-place reload): directly from an
in-process engine, through `mathctl_reload_weights` from a multiprocess one (vLLM's RPC serialiser
carries bytes, not tensors). Names carry a `mathctl_` prefix
so they cannot collide with the worker's own methods.
"""

from __future__ import annotations

# Hugging Face projections that vLLM fuses into one parameter (its models' `stacked_params_mapping`)
_FUSED = {".q_proj.": ".qkv_proj.", ".k_proj.": ".qkv_proj.", ".v_proj.": ".qkv_proj.",
          ".gate_proj.": ".gate_up_proj.", ".up_proj.": ".gate_up_proj."}


class WeightSync:
    """Mixed into vLLM's worker class."""

    def mathctl_weight_names(self) -> list[str]:
        """Parameter names of the served model (vLLM's, fused projections included)."""
        model = self.model_runner.model  # type: ignore[attr-defined]
        return sorted(name for name, _ in model.named_parameters())

    def mathctl_reload_weights(self, payload: bytes) -> None:
        """Reload the (name, tensor) pairs of one safetensors-encoded bucket (whole decoder layers)."""
        from safetensors.torch import load

        self.reload_weights(weights_iterator=list(load(payload).items()))  # type: ignore[attr-defined]


def accepts_name(name: str, known: set[str]) -> bool:
    """Whether a Hugging Face weight name has a home in a vLLM model with parameters `known`."""
    if name in known or name == "lm_head.weight":  # vLLM skips a tied head itself
        return True
    return any(part in name and name.replace(part, fused) in known for part, fused in _FUSED.items())
