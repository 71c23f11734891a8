"""torch 2.x's DCP entry points on Debian's torch 1.13, for running the
examples (written for torch 2.2+) in preemptd's tests: with this folder on
PYTHONPATH, `import torch.distributed.checkpoint as dcp` gives 1.13's DCP
(through dcp_compat, which makes it importable on Python 3.11) with
dcp.save(state_dict, checkpoint_id=path) and dcp.load(state_dict,
checkpoint_id=path). On torch 2.x it does nothing.
"""
import importlib.abc
import importlib.util
import os
import sys
import types

_HERE = os.path.dirname(os.path.abspath(__file__))


class _DCP2(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name != "torch.distributed.checkpoint":
            return None
        import torch

        if not torch.__version__.startswith("1."):
            return None
        return importlib.util.spec_from_loader(name, self)

    def create_module(self, spec):
        sys.path.insert(0, os.path.dirname(_HERE))
        from dcp_compat import dcp

        m = types.ModuleType(spec.name)
        m.__dict__.update({k: v for k, v in vars(dcp).items() if not k.startswith("__")})
        m.save = lambda sd, checkpoint_id: dcp.save_state_dict(sd, storage_writer=dcp.FileSystemWriter(checkpoint_id))
        m.load = lambda sd, checkpoint_id: dcp.load_state_dict(sd, storage_reader=dcp.FileSystemReader(checkpoint_id))
        return m

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _DCP2())
