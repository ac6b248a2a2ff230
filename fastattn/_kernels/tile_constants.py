"""The tile core's constants for the Python side (mirrors the enums in tile.pxd)."""
MASK_NONE, MASK_BOOL, MASK_FLOAT = 0, 1, 2
BLOCK_SKIP, BLOCK_MASKED, BLOCK_FULL = 0, 1, 2
