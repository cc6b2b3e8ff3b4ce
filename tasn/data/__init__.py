"""Everything between raw images on disk and a torch DataLoader.

layout (CUB-200-2011 tables), synth (the embedded sample), importers (CUB, folder per class),
validate (manifest + great-expectations suite + report), preprocess (shards), dataset and
transforms (what training reads). Submodules are imported where used, so importing one does not
pull in pandas, great-expectations or torchvision for the others.
"""
