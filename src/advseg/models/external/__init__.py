"""Models advseg did not train: nnU-Net v2 results folders, MONAI bundles, TorchScript files and a
user's own module. Each yields an ordinary differentiable function from the image (in the
source's units) to logits on the source's grid, so every attack works on it unchanged."""
