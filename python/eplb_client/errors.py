"""The client's error type, shared by the Python writer (:mod:`eplb_client.region`) and the
compiled core's binding (:mod:`eplb_client._native`)."""


class ContractError(RuntimeError):
    """The region cannot be created or used as the contract says (the message says why)."""
