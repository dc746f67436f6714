"""HOW attention is computed: ops with an fp32 reference and backends chosen by capability."""

from . import dispatch, token_sparse
from .block_sparse import block_sparse, to_flex_block_mask
from .dense import dense
from .merge import merge_attention
from .reference import reference
from .token_sparse import compress, decompress

__all__ = ["reference", "dense", "block_sparse", "token_sparse", "compress", "decompress",
           "merge_attention", "dispatch", "to_flex_block_mask"]
