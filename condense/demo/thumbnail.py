"""Weights that make an open_clip ViT see like a perceptual hash: the demo's CLIP stand-in.

No CLIP weights can be downloaded where the demo runs, and a ViT with random weights maps every
photo to nearly the same direction (cosines of 0.9 to 0.999 between unrelated photos), so its
dedup merges everything. Instead of random weights, the demo sets the weights of a small,
ordinary open_clip ViT (condense/demo/thumbnail-clip.json: 64 px, 8 px patches, one block)
by hand, so that its image embedding is the image's 8 x 8 colour thumbnail, made symmetric
under a horizontal flip (mirror columns summed) and with each colour's mean removed:

- the patch embedding averages each patch's colour into channels 0-2, and the position
  embedding marks each token with its own channel (a large one-hot, M);
- attention is switched off (zero output projection); the MLP copies the token's colour into
  the slot of its position: hidden units gelu(+x + gate) - gelu(-x + gate) = x where the gate
  is open (0) at the token's own position and shut (-B) elsewhere;
- average pooling gathers the 64 slots into one vector; the projection sums mirror columns and
  subtracts each colour's mean.

Re-compressed, colour-shifted, slightly cropped, brightened or flipped copies of a photo stay
above cosine 0.86; different photos mostly fall far below. The model is loaded through the
`checkpoint` setting exactly like real weights would be; its text tower keeps random weights,
so clip scores (and the bands built on them) are arbitrary in the demo.
"""

from __future__ import annotations

from pathlib import Path

GRID = 8  # thumbnail side: 64 px image / 8 px patches
COLOURS = 3
ONEHOT = COLOURS  # first position channel
ZERO = ONEHOT + GRID * GRID  # a channel that stays 0: the reference for the gates
SLOTS = ZERO + 1  # first output slot channel: slot (position, colour)
M = 100.0  # position one-hot size: dominates each token's LayerNorm statistics
B = 30.0  # gate depth: gelu(-30) is 0 in float32


def thumbnail_weights(model) -> None:
    """Set `model`'s visual tower (built from thumbnail-clip.json) to the thumbnail embedding."""
    import torch

    visual = model.visual
    width = visual.conv1.weight.shape[0]
    cells = GRID * GRID
    if width < SLOTS + cells * COLOURS or visual.grid_size != (GRID, GRID):
        raise ValueError("thumbnail weights need thumbnail-clip.json's shape")
    with torch.no_grad():
        for p in visual.parameters():
            p.zero_()
        patch = visual.conv1.weight.shape[-1]
        for c in range(COLOURS):  # channel c = the patch's mean colour c
            visual.conv1.weight[c, c] = 1.0 / (patch * patch)
        for cell in range(cells):  # token 1 + cell (row-major) carries its one-hot
            visual.positional_embedding[1 + cell, ONEHOT + cell] = M
        block = visual.transformer.resblocks[0]
        for norm in (block.ln_1, block.ln_2, visual.ln_post):
            norm.weight.fill_(1.0)
        # block.attn.out_proj is zero: attention adds nothing.
        fc, proj = block.mlp.c_fc, block.mlp.c_proj
        # After ln_2 a token t is (t - mean) / std, std ~ M / sqrt(width): t[own] - t[ZERO] is
        # the same for every token, so `open` = (t[own] - t[ZERO]) / that - 1 is 0 there.
        own = M / ((M * M / width) * (1 - 1 / width)) ** 0.5
        unit = 0
        for cell in range(cells):
            for c in range(COLOURS):
                for sign in (1.0, -1.0):
                    fc.weight[unit, c] += sign
                    fc.weight[unit, ZERO] -= sign
                    fc.weight[unit, ONEHOT + cell] += B / own
                    fc.weight[unit, ZERO] -= B / own
                    fc.bias[unit] = -B
                    proj.weight[SLOTS + cell * COLOURS + c, unit] = sign
                    unit += 1
        # Projection: the mirror-symmetric thumbnail (columns x and GRID-1-x summed), each
        # colour's mean removed (which also cancels ln_post's shift of every slot).
        out = visual.proj
        for row in range(GRID):
            for col in range(GRID // 2):
                for c in range(COLOURS):
                    q = (row * (GRID // 2) + col) * COLOURS + c
                    for x in (col, GRID - 1 - col):
                        out[SLOTS + (row * GRID + x) * COLOURS + c, q] += 1.0
                    for cell in range(cells):
                        out[SLOTS + cell * COLOURS + c, q] -= 2.0 / cells


def write_checkpoint(config: str | Path, path: str | Path) -> Path:
    """Build the thumbnail-clip model, set its weights and save an open_clip checkpoint."""
    import torch

    from condense.stages.embed.clip import create_model

    torch.manual_seed(0)  # the text tower's random weights
    model = create_model(str(config))
    thumbnail_weights(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path
