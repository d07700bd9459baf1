"""Example user policies shipped with winnow (:mod:`winnow.stages.user_policy` is the contract): each module
has a ``policy(shard)`` function, used as ``winnow select RUN python:winnow.stages.policies.<module>:policy``.

* :mod:`~winnow.stages.policies.tool_call_keys`: TL-Training's key-token weights and error filter."""
