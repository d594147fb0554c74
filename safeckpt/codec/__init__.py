"""State tree <-> msgpack skeleton plus tensors.

Every value that is not a tensor is written to msgpack. Values msgpack has no
type for are written either as an *extension* (a leaf: ``Ext`` codes below) or
as a *tagged array*: an array whose first element is the ``Ext.TAG`` extension
holding one ``Tag`` byte (``[TAG(TUPLE), 1, 2]`` is the tuple ``(1, 2)``). Tagged
arrays are rebuilt by msgpack's ``list_hook`` in the C decoder's single pass, so
decoding never recurses in Python however deep the state is. Tensors become
``[TAG(TENSOR), entry, flags, view]`` and their bytes go to a :class:`TensorPlan`.

Decoding never imports a module or calls a constructor unless the caller's
:class:`AllowList` names it; unknown extension codes and tags are errors.
"""

from .decode import Decoder
from .encode import Encoder
from .types import Ext, Tag, array_from_bytes, pack, render_path

__all__ = ["Decoder", "Encoder", "Ext", "Tag", "array_from_bytes", "pack", "render_path"]
