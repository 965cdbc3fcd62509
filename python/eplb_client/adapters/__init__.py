"""Adapters that attach eplb to a real inference engine (contract 2, docs/adapters.md).

* :mod:`eplb_client.adapters.sglang`: an SGLang 0.5.23 plugin (entry point ``sglang.srt.plugins``,
  enabled with ``SGLANG_PLUGINS=eplb``).
* :mod:`eplb_client.adapters.vllm`: a vLLM 0.33.0 ``worker_extension_cls``.

Both build on :class:`eplb_client.adapters.core.Attachment`, which holds what is common: the
region made from the engine's own expert tensors (routed rows only, global tensors marked
global), the load path (the engine's own per-pass physical counts, copied without a host sync per
pass), the apply at the step boundary and the commit through a callback that updates the engine's
own maps. Importing this package imports neither engine nor torch.
"""

from .core import AdapterError, Attachment, ExpertParam

__all__ = ["AdapterError", "Attachment", "ExpertParam"]
