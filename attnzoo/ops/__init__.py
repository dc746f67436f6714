"""HOW attention is computed: ops with an fp32 reference and backends chosen by capability."""

from . import antidiagonal, dispatch, head_router, pages, pooled, selection, token_sparse  # noqa: F401  (ops register)
from .block_sparse import block_sparse, to_flex_block_mask
from .dense import dense
from .merge import merge_attention
from .mixed import mixed
from .reference import reference
from .token_sparse import compress, decompress

__all__ = ["reference", "dense", "block_sparse", "token_sparse", "compress", "decompress",
           "merge_attention", "dispatch", "to_flex_block_mask", "mixed"]

from . import kernels  # noqa: E402,F401  (GPU backends: declarations only, kernels load lazily)
