"""Code that runs inside vLLM's workers, added to them with `LLM(worker_extension_cls=...)`.

vLLM calls these methods through `collective_rpc("name", ...)`: a method name crosses process
boundaries in every executor (uniprocess, multiprocess, external launcher), a Python function does
not. Weights go through the worker's own `reload_weights` (vLLM's in-place reload): directly from an
in-process engine, through `mathctl_reload_weights` from a multiprocess one (vLLM's RPC serialiser
carries bytes, not tensors). Names carry a `mathctl_` prefix so they cannot collide with the
worker's own methods.
"""

from __future__ import annotations


class WeightSync:
    """Mixed into vLLM's worker class."""

    def mathctl_reload_weights(self, payload: bytes) -> None:
        """Reload the (name, tensor) pairs of one safetensors-encoded bucket (whole decoder layers)."""
        from safetensors.torch import load

        self.reload_weights(weights_iterator=list(load(payload).items()))  # type: ignore[attr-defined]
