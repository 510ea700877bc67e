"""The posterior file format: tensors and plain data only, a format version and a checksum.

A file written by :meth:`pbnn.Posterior.save` is::

    b"PBNN-POSTERIOR\\n"
    {"format": "pbnn.posterior", "version": 1, "sha256": "...", "size": N}\\n   (one JSON line)
    N bytes: torch.save of a dict of tensors and plain data (str, int, float, bool, None,
             lists, tuples and dicts of them)

Reading checks the header, the payload's size and SHA-256 (one flipped byte anywhere is a
ValueError), then reads the payload with ``torch.load(weights_only=True)``: nothing in the file
can run code. Approximations and predictors are stored as a type tag plus tensors and plain
data and rebuilt by the class registered under that tag (:func:`register`); nothing is
unpickled. The one exception is the model (a user's ``nn.Module`` or function, not plain
data): it is kept pickled in a separate byte field that :meth:`pbnn.Posterior.load` unpickles
only when called with ``trusted=True``.

Example:
    >>> import io
    >>> data = dump({"w": torch.ones(2)})
    >>> data[:15]
    b'PBNN-POSTERIOR\\n'
    >>> read(io.BytesIO(data), "example")["w"]
    tensor([1., 1.])
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from typing import Any

import torch
from torch.distributions import transforms as T

__all__ = [
    "MAGIC",
    "FORMAT",
    "VERSION",
    "NotThisFormat",
    "dump",
    "read",
    "register",
    "encode",
    "decode",
    "to_plain",
    "encode_transform",
    "decode_transform",
]

MAGIC = b"PBNN-POSTERIOR\n"
FORMAT = "pbnn.posterior"
VERSION = 2  # 2: draws made on demand are stored as a recipe ("draws"), not as tensors

# tag -> (kind, class or function); kind is "approximation" or "predictor"
_REGISTRY: dict[str, tuple[str, Any]] = {}


def register(kind: str, tag: str) -> Callable:
    """Decorator: make a class or function storable in posterior files under ``tag``.

    A class needs ``state(self) -> dict`` (tensors and plain data, nested values may be other
    registered objects encoded with :func:`encode`) and ``from_state(cls, state)``; a function
    is stored by its tag alone. ``kind`` is ``"approximation"`` or ``"predictor"``.

    Example:
        >>> @register("predictor", "doc-example")
        ... def my_predictor(post, draws, x): ...
        >>> encode("predictor", my_predictor)
        {'type': 'doc-example'}
    """

    def deco(obj):
        if tag in _REGISTRY and _REGISTRY[tag][1] is not obj:
            raise ValueError(f"the tag {tag!r} is already registered for {_REGISTRY[tag][1]!r}")
        _REGISTRY[tag] = (kind, obj)
        return obj

    return deco


def encode(kind: str, obj) -> dict | None:
    """``{"type": tag, "state": ...}`` of a registered object (None for None)."""
    if obj is None:
        return None
    for tag, (k, registered) in _REGISTRY.items():
        if k != kind:
            continue
        if registered is obj:  # a registered function
            return {"type": tag}
        if isinstance(registered, type) and type(obj) is registered:
            return {"type": tag, "state": obj.state()}
    raise ValueError(
        f"cannot store the {kind} {obj!r} in a posterior file: files hold registered types only "
        f"(no pickle). Register it with pbnn.posterior.serialization.register({kind!r}, tag) (a "
        f"function, or a class with state() and from_state()), or set post.{kind} = None before saving"
    )


def decode(kind: str, entry: dict | None):
    """The object :func:`encode` described."""
    if entry is None:
        return None
    tag = entry.get("type")
    if tag not in _REGISTRY or _REGISTRY[tag][0] != kind:
        raise ValueError(
            f"this file holds a {kind} of type {tag!r}, which is not registered in this process; "
            "import the module that registers it (pbnn.posterior.serialization.register) before loading"
        )
    registered = _REGISTRY[tag][1]
    return registered.from_state(entry["state"]) if isinstance(registered, type) else registered


# ----------------------------------------------------------------------------- transforms
_SIMPLE = {
    "exp": T.ExpTransform,
    "sigmoid": T.SigmoidTransform,
    "softplus": T.SoftplusTransform,
    "tanh": T.TanhTransform,
    "lower_cholesky": T.LowerCholeskyTransform,
    "corr_cholesky": T.CorrCholeskyTransform,
    "stick_breaking": T.StickBreakingTransform,
    "softmax": T.SoftmaxTransform,
}


def encode_transform(t: T.Transform) -> dict:
    """Plain-data description of the transforms ``biject_to`` returns (compose, affine,
    independent and the parameter-free ones)."""
    if type(t) is T.ComposeTransform:
        return {"type": "compose", "parts": [encode_transform(p) for p in t.parts]}
    if type(t) is T.AffineTransform:
        return {"type": "affine", "loc": t.loc, "scale": t.scale, "event_dim": t.event_dim}
    if type(t) is T.IndependentTransform:
        return {"type": "independent", "base": encode_transform(t.base_transform), "ndims": t.reinterpreted_batch_ndims}
    for tag, cls in _SIMPLE.items():
        if type(t) is cls:
            return {"type": tag}
    raise ValueError(f"cannot store the transform {t!r} in a posterior file (not one biject_to gives)")


def decode_transform(d: dict) -> T.Transform:
    tag = d["type"]
    if tag == "compose":
        parts = [decode_transform(p) for p in d["parts"]]
        return T.identity_transform if not parts else T.ComposeTransform(parts)
    if tag == "affine":
        return T.AffineTransform(d["loc"], d["scale"], event_dim=d["event_dim"])
    if tag == "independent":
        return T.IndependentTransform(decode_transform(d["base"]), d["ndims"])
    if tag in _SIMPLE:
        return _SIMPLE[tag]()
    raise ValueError(f"unknown transform {tag!r} in a posterior file")


# ----------------------------------------------------------------------------- plain data
def to_plain(value):
    """``value`` as tensors and plain data (what ``weights_only=True`` reads back): numbers
    and strings (numpy scalars become Python numbers, numpy arrays tensors), tensors
    (detached), and lists, tuples and dicts of them. Raises TypeError for anything else."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, torch.Tensor):
        return value.detach()
    for base in (bool, int, float, str):  # subclasses (numpy.float64, IntEnum, ...) as the base type
        if isinstance(value, base):
            return base(value)
    if type(value).__module__ == "numpy":
        if hasattr(value, "shape") and value.shape != ():
            return torch.as_tensor(value)
        return to_plain(value.item())
    if isinstance(value, (list, tuple)):
        return (tuple if type(value) is tuple else list)(to_plain(v) for v in value)
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if type(k) not in (str, int, float, bool):
                raise TypeError(f"dict key {k!r}")
            out[k] = to_plain(v)
        return out
    raise TypeError(f"{type(value).__qualname__} is not plain data")


# ----------------------------------------------------------------------------- the container
def dump(payload: dict) -> bytes:
    """The bytes of a posterior file holding ``payload`` (tensors and plain data)."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    body = buf.getvalue()
    header = {"format": FORMAT, "version": VERSION, "sha256": hashlib.sha256(body).hexdigest(), "size": len(body)}
    return MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + body


class NotThisFormat(ValueError):
    """The file does not start with :data:`MAGIC` (an older pbnn's file, or not pbnn's)."""


def read(f, name: str, map_location=None) -> dict:
    """The payload of the posterior file open in ``f`` (``name`` for messages), checked.

    Raises :class:`NotThisFormat` when ``f`` does not start like a posterior file, and a
    ValueError for a damaged header, a wrong size or checksum, or a newer version.
    """
    if f.read(len(MAGIC)) != MAGIC:
        raise NotThisFormat(name)
    damaged = f"{name!r} is damaged (a corrupt or truncated pbnn posterior file)"
    line = f.readline(4096)
    try:
        header = json.loads(line)
        size, digest, version = int(header["size"]), str(header["sha256"]), header["version"]
        if header["format"] != FORMAT:
            raise ValueError
    except Exception:
        raise ValueError(f"{damaged}: its header is unreadable; save the posterior again") from None
    if not isinstance(version, int) or version > VERSION:
        raise ValueError(
            f"{name!r} is a posterior file of format version {version!r}; this pbnn reads up to "
            f"version {VERSION}: upgrade pbnn to load it"
        )
    body = f.read(size + 1)
    if len(body) != size:
        raise ValueError(f"{damaged}: it holds {len(body)} bytes of data, its header says {size}; save it again")
    if hashlib.sha256(body).hexdigest() != digest:
        raise ValueError(f"{damaged}: its checksum does not match its contents (a changed byte); save it again")
    try:
        return torch.load(io.BytesIO(body), weights_only=True, map_location=map_location)
    except Exception as e:  # a valid checksum over content that is not plain data: crafted
        raise ValueError(f"{name!r} holds more than tensors and plain data ({type(e).__name__}); refusing it") from None


def to_bytes_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)


def pickled(obj) -> bytes:
    """``torch.save`` of ``obj`` (a model) as bytes."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def unpickle(data: torch.Tensor, map_location=None):
    """Unpickle a byte field: runs code from the file, so only for files the caller trusts."""
    return torch.load(io.BytesIO(data.cpu().numpy().tobytes()), weights_only=False, map_location=map_location)
