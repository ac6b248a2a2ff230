"""
Attention patterns for long sequences
=====================================

Which keys each query may attend to, for the patterns of the
:doc:`long-sequence guide </guide/long-sequences>`, on a 512-token sequence. Each
panel is the element rule (black = attended); grey marks the rest of the 32 x 32
tiles the block-sparse kernel visits (:class:`fastattn.BlockLayout`), so the share
of tiles visited, printed in each title, is what the pattern costs relative to
dense attention.
"""
import matplotlib.pyplot as plt
import numpy as np

import fastattn

N, BLOCK = 512, 32

# %%
# The patterns as block layouts
# -----------------------------
# ``BlockLayout.from_rule`` finds the tiles of an element rule from its index ranges;
# ``bigbird_layout`` draws BigBird's random blocks (seeded, so the picture is
# reproducible).
patterns = {
    "causal": fastattn.BlockLayout.from_rule((N, N), BLOCK, causal=True),
    "sliding window (48, 0)": fastattn.BlockLayout.from_rule((N, N), BLOCK, window=(48, 0)),
    "Longformer (16) + global token 0": fastattn.BlockLayout.from_rule(
        (N, N), BLOCK, window=16, global_query=np.arange(N) == 0, global_key=np.arange(N) == 0),
    "dilated window (64, 0), dilation 4": fastattn.BlockLayout.from_rule(
        (N, N), BLOCK, window=(64, 0), dilation=4),
    "BigBird (block 32)": fastattn.bigbird_layout(N, block_size=BLOCK, num_random_blocks=2,
                                                  rng=0),
    "strided (Sparse Transformer, 64)": fastattn.BlockLayout.from_mask(
        fastattn.reference.strided_keep(N, N, 64), BLOCK),
}
for name, layout in patterns.items():
    print(f"{name:36s} {layout}")

# %%
# Element rules and visited tiles
# -------------------------------
fig, axes = plt.subplots(2, 3, figsize=(10, 7), constrained_layout=True)
for ax, (name, layout) in zip(axes.flat, patterns.items()):
    keep = layout.to_mask().reshape(N, N)                       # the element rule
    tiles = np.kron(layout.block_mask().reshape(N // BLOCK, N // BLOCK),
                    np.ones((BLOCK, BLOCK), dtype=bool))          # the visited tiles
    shade = np.where(keep, 1.0, np.where(tiles, 0.25, 0.0))
    ax.imshow(shade, cmap="Greys", interpolation="nearest", vmin=0, vmax=1)
    ax.set_xticks(np.arange(0, N + 1, BLOCK) - 0.5, minor=True)
    ax.set_yticks(np.arange(0, N + 1, BLOCK) - 0.5, minor=True)
    ax.grid(which="minor", color="tab:blue", linewidth=0.4, alpha=0.5)
    ax.tick_params(which="minor", length=0)
    ax.set_xticks([0, N // 2, N - 1])
    ax.set_yticks([0, N // 2, N - 1])
    ax.set_title(f"{name}\n{layout.density:.0%} of tiles visited", fontsize=10)
    ax.set_xlabel("key position j")
    ax.set_ylabel("query position i")
fig.suptitle(f"Attention patterns, N = {N}, tiles of {BLOCK} x {BLOCK}")
plt.show()

# %%
# The same rule through the kernel
# --------------------------------
# Block-sparse attention over a layout gives what dense attention under the
# layout's element mask gives, at the cost of the visited tiles only.
rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal((1, 4, N, 32), dtype=np.float32) for _ in range(3))
layout = patterns["Longformer (16) + global token 0"]
sparse = fastattn.block_sparse_attention(q, k, v, layout)
dense = fastattn.scaled_dot_product_attention(q, k, v, layout.to_mask())
print("largest difference, block-sparse vs. masked dense:", float(np.abs(sparse - dense).max()))
