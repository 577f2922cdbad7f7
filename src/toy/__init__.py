"""The toy world, in one place: what the project ships so that everything runs offline and visibly learns.

- `world`: seeded procedural scenes of coloured shapes and their exact captions and class maps;
- `judge`: parses a generated scene into coloured blobs (caption fidelity, shape mIoU);
- `backbone`: the architecture of the shipped toy model (`assets/toy-sd/`);
- `pretrain`: how that model is trained (`python -m src.pretrain`), resumable and bit-reproducible.

The project's converters write the world in the COCO and ADE20K layouts for the demo datasets; they import
this package, never the reverse.
"""
