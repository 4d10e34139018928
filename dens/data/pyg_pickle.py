"""Read and write pickled ``torch_geometric.data.Data`` records without torch_geometric.

OC20/OC22 LMDB entries are pickled PyG ``Data`` objects in one of two layouts:

* PyG 1.x: the object's state is a plain attribute dict (``pos``, ``cell``, ``y``, ``force``, ...,
  ``__num_nodes__``). Current PyG refuses to use such objects.
* PyG 2.x: the state holds ``_store``, a ``GlobalStorage`` whose ``_mapping`` is the attribute dict.

:func:`loads` maps every ``torch_geometric`` class to a small stand-in and :func:`record_mapping` returns
the attribute dict for both layouts. :func:`dumps_data` writes a record in the PyG 1.x layout (what the
original OC20 files use), which both current OCP/fairchem (through its PyG-1 transform) and ``dens``
read. As with any pickle, only open files from sources you trust.

Examples
--------
>>> import torch
>>> blob = dumps_data({"pos": torch.zeros(2, 3), "natoms": 2})
>>> sorted(record_mapping(loads(blob)))
['natoms', 'pos']
"""

from __future__ import annotations

import io
import pickle
from typing import Any

__all__ = ["PygStandIn", "dumps_data", "loads", "record_mapping"]

_PYG_DATA_GLOBAL = b"ctorch_geometric.data.data\nData\n"


class PygStandIn:
    """Stand-in for any ``torch_geometric`` object met while unpickling."""

    _pyg_name = "object"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.__dict__["_args"] = args
        self.__dict__.update(kwargs)

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            state = {**(state[0] or {}), **state[1]}  # (dict state, slot state)
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_state"] = state

    def __repr__(self) -> str:
        keys = [k for k in self.__dict__ if not k.startswith("_")]
        return f"<{self._pyg_name} stand-in {keys}>"


class PygData(PygStandIn):
    """Stand-in for ``torch_geometric.data.Data``."""

    _pyg_name = "Data"


class PygStorage(PygStandIn):
    """Stand-in for ``torch_geometric.data.storage.*Storage``."""

    _pyg_name = "Storage"


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("torch_geometric"):
            if name in ("Data", "HeteroData", "Batch", "DataBatch"):
                return PygData
            if name.endswith("Storage"):
                return PygStorage
            return type(name, (PygStandIn,), {"_pyg_name": name})
        return super().find_class(module, name)


def loads(blob: bytes) -> Any:
    """Unpickle ``blob``, replacing ``torch_geometric`` classes by stand-ins.

    Parameters
    ----------
    blob : bytes
        A pickle, e.g. one LMDB value.

    Returns
    -------
    object
        The unpickled object (``PygData`` for a PyG ``Data``).
    """
    return _Unpickler(io.BytesIO(blob)).load()


def record_mapping(obj: Any) -> dict[str, Any]:
    """The attribute dict of a pickled record (PyG 1.x or 2.x layout, stand-in or a plain dict).

    Parameters
    ----------
    obj : object
        What :func:`loads` returned for one record.

    Returns
    -------
    dict
        Attribute name to value, private entries (``_store``, ``__num_nodes__``...) removed.
    """
    if isinstance(obj, dict):
        return dict(obj)
    d = getattr(obj, "__dict__", None)
    if d is None:
        raise TypeError(f"cannot interpret a record of type {type(obj).__name__}")
    store = d.get("_store")
    if store is not None:
        mapping = getattr(store, "__dict__", {}).get("_mapping")
        if mapping is None and isinstance(store, dict):
            mapping = store
        if mapping is None:
            raise TypeError("PyG 2 record without a '_mapping' in its '_store'")
        return {k: v for k, v in mapping.items() if not k.startswith("_")}
    return {k: v for k, v in d.items() if not k.startswith("_")}


class _OldPygPickler(pickle._Pickler):  # type: ignore[name-defined]  # the pure-Python pickler
    def save_global(self, obj: Any, name: str | None = None) -> None:
        if obj is PygData:
            self.write(_PYG_DATA_GLOBAL)
            self.memoize(obj)
            return
        super().save_global(obj, name)


def dumps_data(mapping: dict[str, Any]) -> bytes:
    """Pickle ``mapping`` as a PyG 1.x ``torch_geometric.data.data.Data`` object.

    Parameters
    ----------
    mapping : dict
        Attributes (tensors, numbers, strings).

    Returns
    -------
    bytes
        A pickle that current OCP/fairchem readers and :func:`loads` understand.
    """
    obj = PygData.__new__(PygData)
    obj.__dict__.update({"__num_nodes__": None, **mapping})
    buf = io.BytesIO()
    _OldPygPickler(buf, protocol=4).dump(obj)
    return buf.getvalue()
