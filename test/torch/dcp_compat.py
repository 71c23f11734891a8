"""torch 1.13's torch.distributed.checkpoint (DCP), importable on Python 3.11
(`from dcp_compat import dcp`).

torch 1.13's DCP on Python 3.11: a dataclass field defaults to another
dataclass instance, which 3.11 refuses as a mutable default. While its
modules load, such a default becomes a default_factory that copies it.
"""
import copy  # noqa: E402
import dataclasses  # noqa: E402

_get_field = dataclasses._get_field


def _tolerant_get_field(cls, name, *args):
    try:
        return _get_field(cls, name, *args)
    except ValueError as e:
        if "mutable default" not in str(e):
            raise
        default = cls.__dict__[name]
        setattr(cls, name, dataclasses.field(default_factory=lambda d=default: copy.deepcopy(d)))
        return _get_field(cls, name, *args)


dataclasses._get_field = _tolerant_get_field
try:
    import torch.distributed._shard.checkpoint as dcp  # noqa: E402
finally:
    dataclasses._get_field = _get_field

